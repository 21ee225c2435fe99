"""host_memory: a freed large block is reused without page faults (Linux/glibc) until retaining is
undone, or faults in by 2 MB pages once the process has restarted with huge pages; which mode runs;
retaining stops when a step's temporaries would not fit."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from ecm_jax import runtime
from ecm_jax.cpu import host_memory
from helpers import REPO  # noqa: E402


def _child_env(**extra) -> dict[str, str]:
  """This environment for a child process, without any glibc tunables of ours, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  return dict(env, **extra)


def _skip_without_huge_pages():
  if not host_memory.huge_pages_available():
    pytest.skip('no transparent huge pages or glibc < 2.35 here')


# In a fresh process (mallopt changes the whole process): fill a 256 MB block from malloc twice,
# freeing it in between, and print the minor page faults of the second fill (malloc as XLA
# allocates: numpy would ask the kernel for huge pages itself). Mode 'returned' retains, fills,
# then undoes retaining before the two fills.
_CHILD = textwrap.dedent('''
    import ctypes, ctypes.util, resource, sys
    from ecm_jax.cpu import host_memory
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = (ctypes.c_void_p,)
    def fill():
      block = libc.malloc(2**28)
      ctypes.memset(block, 1, 2**28)
      libc.free(block)
    if sys.argv[1] == 'huge_pages':
      assert host_memory.configure('huge_pages') == 'huge_pages'  # after restarting itself
    elif sys.argv[1] != 'default' and not host_memory.retain_freed_memory():
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
                       cwd=REPO, env=_child_env())
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


def test_huge_pages_restart_the_process_and_fault_by_2mb():
  _skip_without_huge_pages()
  # 2 MB pages: 128 faults for the 256 MB block instead of 65,536 (a few more where the kernel
  # had no free huge page at hand and fell back to 4 KB ones).
  assert _second_fill_faults('huge_pages') < 2**28 // 4096 // 10


_RESTARTED = textwrap.dedent('''
    import os, sys
    from ecm_jax.cpu import host_memory
    print('started', flush=True)
    in_effect = host_memory.configure(sys.argv[1])
    print(in_effect, sys.argv[2:], os.environ.get('GLIBC_TUNABLES'), os.environ['KEEP'])
''')


@pytest.mark.parametrize('mode, tunables, expected', [
    # Restarted once: same arguments and environment, the tunable appended to the user's.
    ('huge_pages', 'glibc.malloc.arena_max=2',
     'huge_pages [\'a\', \'--b=1\'] glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 kept'),
    ('huge_pages+retain', None, "huge_pages+retain ['a', '--b=1'] glibc.malloc.hugetlb=1 kept"),
    # The environment already says (a parent, the user): left as it is, no restart.
    ('huge_pages', 'glibc.malloc.hugetlb=0', "default ['a', '--b=1'] glibc.malloc.hugetlb=0 kept"),
    ('default', None, "default ['a', '--b=1'] None kept"),
])
def test_configure_restarts_for_huge_pages_keeping_arguments_and_environment(mode, tunables,
                                                                              expected):
  if 'huge_pages' in mode:
    _skip_without_huge_pages()
  env = _child_env(KEEP='kept', **({} if tunables is None else {'GLIBC_TUNABLES': tunables}))
  out = subprocess.run([sys.executable, '-c', _RESTARTED, mode, 'a', '--b=1'], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  restarted = 'huge_pages' in mode and tunables != 'glibc.malloc.hugetlb=0'
  assert out == ['started'] * (2 if restarted else 1) + [expected]


@pytest.mark.parametrize('mode, inherited', [
    ('huge_pages', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ('huge_pages+retain', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),
    ('default', 'glibc.malloc.arena_max=2'),
    ('retain', 'glibc.malloc.arena_max=2'),
])
def test_child_processes_inherit_the_mode_huge_pages(monkeypatch, mode, inherited):
  monkeypatch.setattr(host_memory, 'huge_pages_available', lambda: True)
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2')
  with host_memory.for_child_processes(mode):
    out = subprocess.run([sys.executable, '-c', 'import os; print(os.environ["GLIBC_TUNABLES"])'],
                         capture_output=True, text=True, check=True).stdout.strip()
  assert out == inherited
  assert os.environ['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1:glibc.malloc.arena_max=2'


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
                       'available; steps run slower (ecm_jax/cpu/host_memory.py)')
  else:
    assert message is None


def test_available_bytes_reads_meminfo():
  available = host_memory.available_bytes()
  if available is None:
    pytest.skip('no /proc/meminfo here')
  total = int(pathlib.Path('/proc/meminfo').read_text().split()[1]) * 1024  # MemTotal, first line
  assert 0 < available <= total


@pytest.mark.parametrize('platforms, plugin, huge_pages, expected', [
    ('cpu', True, True, 'huge_pages+retain'),  # forced onto the CPU though a GPU plugin is installed
    ('', False, True, 'huge_pages+retain'),    # only the CPU backend is installed
    ('', False, False, 'retain'),              # no huge pages to be had
    ('', True, True, 'default'),               # a GPU/TPU will run: its buffers are device memory
    ('cuda', False, True, 'default'),
])
def test_auto_acts_only_on_cpu(monkeypatch, platforms, plugin, huge_pages, expected):
  monkeypatch.setenv('JAX_PLATFORMS', platforms)
  monkeypatch.setattr(runtime, 'accelerator_plugin_installed', lambda: plugin)
  monkeypatch.setattr(host_memory, 'huge_pages_available', lambda: huge_pages)
  assert host_memory.resolve('auto') == expected
  for mode in runtime.HOST_MEMORY_MODES[1:]:
    assert host_memory.resolve(mode) == mode


def test_unknown_mode_is_refused():
  modes = "('auto', 'huge_pages+retain', 'huge_pages', 'retain', 'default')"
  with pytest.raises(ValueError, match=re.escape(f"one of {modes}, got 'keep'")):
    runtime.configure_host_memory('keep')
