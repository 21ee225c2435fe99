"""Test-session setup: two simulated CPU devices (for the data-parallel tests) before jax loads."""

import os
import pathlib
import sys

_flag = '--xla_force_host_platform_device_count=2'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `configs` and `ecm_jax` importable without installing

# Real images for tests, beside the repo; tests that use it skip when absent.
SHARED_DATA = REPO.parent / 'shared' / 'data'

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain's multiprocessing reads absl flags
