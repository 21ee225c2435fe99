"""host_memory: a freed large block is reused without page faults (Linux/glibc); which mode runs."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

from ecm_jax import host_memory

# In a fresh process (mallopt changes the whole process): fill a 256 MB array twice, freeing it in
# between, and print the minor page faults of the second fill.
_CHILD = textwrap.dedent('''
    import resource, sys
    import numpy as np
    from ecm_jax import host_memory
    if sys.argv[1] == 'retain' and not host_memory.retain_freed_memory():
      sys.exit(3)  # no glibc mallopt
    def fill():
      a = np.ones(2**26, np.float32)
      del a
    fill()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
''')


def _second_fill_faults(mode: str) -> int:
  out = subprocess.run([sys.executable, '-c', _CHILD, mode], capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  if out.returncode == 3:
    pytest.skip('no glibc mallopt here')
  assert out.returncode == 0, out.stderr
  return int(out.stdout)


def test_retained_block_is_reused_without_page_faults():
  retained = _second_fill_faults('retain')
  pages = 2**28 // 4096  # the 256 MB block in 4 KB pages
  # By default glibc unmaps the block on free, so the second fill faults every page in again
  # (fewer if the kernel backs it with huge pages).
  assert _second_fill_faults('default') > pages // 1000
  assert retained < 100


@pytest.mark.parametrize('platforms, plugin, expected', [
    ('cpu', True, 'retain'),      # forced onto the CPU although a GPU plugin is installed
    ('', False, 'retain'),        # only the CPU backend is installed
    ('', True, 'default'),        # a GPU/TPU will run: its buffers are device memory
    ('cuda', False, 'default'),
])
def test_auto_retains_only_on_cpu(monkeypatch, platforms, plugin, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  monkeypatch.setattr(host_memory, 'accelerator_plugin_installed', lambda: plugin)
  assert host_memory.resolve('auto') == expected
  assert host_memory.resolve('retain') == 'retain'
  assert host_memory.resolve('default') == 'default'


def test_unknown_mode_is_refused():
  with pytest.raises(ValueError, match="one of \\('auto', 'retain', 'default'\\), got 'keep'"):
    host_memory.resolve('keep')
