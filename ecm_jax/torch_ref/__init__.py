"""PyTorch reference implementation of the networks, for the JAX-vs-PyTorch numerics report.

Optional: needs `torch` (requirements-torch.txt, the `torch` extra); nothing outside
`ecm_jax.torch_ref` imports it.

  models.py    `build_torch_model(config.model)`: a torch.nn mirror of
               `ecm_jax.models.networks.build_model`,
               module for module under the same names, NCHW.
  convert.py   Flax variables <-> torch state_dict (both ways, bit-exact).
  losses.py    `segmentation_loss`: the hybrid loss of `ecm_jax.train.losses` on torch tensors.
  training.py  `make_optimizer`: torch Adam(weight_decay) + the per-step cosine schedule of
               `ecm_jax.train.train_state`.
  parity.py    the JAX-vs-PyTorch numerics report (`python -m ecm_jax.torch_ref.parity`).
"""
