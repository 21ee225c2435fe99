"""PyTorch reference implementation of the networks, for the JAX-vs-PyTorch numerics report.

Optional: needs `torch` (requirements-torch.txt); nothing outside `ecm_jax.torch_ref` and
`ecm_jax.parity` imports it.

  models.py    `build_torch_model(config.model)`: a torch.nn mirror of `ecm_jax.models.build_model`,
               module for module under the same names, NCHW.
  convert.py   Flax variables <-> torch state_dict (both ways, bit-exact).
  losses.py    `segmentation_loss`: the hybrid loss of `ecm_jax.losses` on torch tensors.
  training.py  `make_optimizer`: torch Adam(weight_decay) + the per-step cosine schedule of
               `ecm_jax.training`.
"""
