"""What exists only for the CPU: the 'gemm' convolution for XLA:CPU and host-memory tuning.

Chosen once from the backend (`ecm_jax.runtime`, `ecm_jax.models.ops`): a GPU/TPU process never
imports this package.
"""
