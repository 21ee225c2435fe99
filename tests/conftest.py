"""Test-session setup before jax loads: two simulated CPU devices (for the data-parallel tests; a
GPU/TPU host uses the devices it has), and true float32 matmuls on every backend."""

import os

_flag = '--xla_force_host_platform_device_count=2'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
# The tolerances of the suite assume true float32 matmuls and convolutions: the CPU's, and on GPUs
# and TPUs precision 'highest' (their default is TF32 / bfloat16 passes; docs/numerics.md).
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
