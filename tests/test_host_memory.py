"""host_memory: a freed large block is reused without page faults (Linux/glibc) until retaining is
undone; which mode runs; retaining stops when a step's temporaries would not fit."""

import pathlib
import subprocess
import sys
import textwrap

import pytest

from ecm_jax import host_memory

# In a fresh process (mallopt changes the whole process): fill a 256 MB array twice, freeing it in
# between, and print the minor page faults of the second fill. Mode 'returned' retains, fills,
# then undoes retaining before the two fills.
_CHILD = textwrap.dedent('''
    import resource, sys
    import numpy as np
    from ecm_jax import host_memory
    def fill():
      a = np.ones(2**26, np.float32)
      del a
    if sys.argv[1] != 'default' and not host_memory.retain_freed_memory():
      sys.exit(3)  # no glibc mallopt
    if sys.argv[1] == 'returned':
      fill()
      assert host_memory.return_freed_memory()
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
  # (fewer if the kernel backs it with huge pages); so it does once retaining is undone.
  assert _second_fill_faults('default') > pages // 1000
  assert _second_fill_faults('returned') > pages // 1000
  assert retained < 100


@pytest.mark.parametrize('retaining, temp_gib, stops', [
    (True, 2, False),   # 3 x 2 GiB fit in the 10 GiB available
    (True, 4, True),    # 3 x 4 GiB do not
    (False, 4, False),  # nothing retained: nothing to stop
])
def test_fit_to_memory_stops_retaining_when_steps_do_not_fit(monkeypatch, retaining, temp_gib, stops):
  returned = []
  monkeypatch.setattr(host_memory, '_retaining', retaining)
  monkeypatch.setattr(host_memory, 'available_bytes', lambda: 10 * 2**30)
  monkeypatch.setattr(host_memory, 'return_freed_memory', lambda: returned.append(True) or True)
  message = host_memory.fit_to_memory(temp_gib * 2**30)
  assert returned == ([True] if stops else [])
  if stops:
    assert message == ("host memory: no longer retaining freed memory: a step's temporaries take "
                       '4.0 GiB and a retaining process can hold 3x that, more than the 10.0 GiB '
                       'available; steps run slower (ecm_jax/host_memory.py)')
  else:
    assert message is None


def test_available_bytes_reads_meminfo():
  available = host_memory.available_bytes()
  if available is None:
    pytest.skip('no /proc/meminfo here')
  total = int(pathlib.Path('/proc/meminfo').read_text().split()[1]) * 1024  # MemTotal, first line
  assert 0 < available <= total


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
