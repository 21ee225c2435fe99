"""Test-session setup: two simulated CPU devices (for the data-parallel tests) before jax loads."""

import os

_flag = '--xla_force_host_platform_device_count=2'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
