"""The networks and the blocks they are built from (flax.linen; no training, data or I/O here).

networks (build_model: EC-CaM-UNet, its ablations and the baselines), layers (convolutions,
BatchNorm, the EC block), attention (CC, SC, CoA and the baselines' attention), aspp (MuS),
bottleneck (CoAG-MuSFu), side_output (DWS), fold (the EC deploy form), ops (array kernels),
summary (the parameters / GFLOPs table).
"""
