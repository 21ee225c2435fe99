"""Host memory on the CPU: a train step's large blocks without a page fault per 4 KB.

glibc's malloc serves every block above 32 MB with a fresh mmap and unmaps it on free. A train step
allocates and frees gigabytes of such blocks (XLA's temporaries, PyTorch's activations), so every
step faults all of them in again, 4 KB at a time, and the kernel zeroes each page first: for the
U-Net step at 256x256, batch 4, on XLA:CPU, 0.6 million page faults and 0.9 s of kernel time per
step. The modes of `configure` (train.py, eval.py and the benchmarks: --host_memory):

  'huge_pages'  glibc backs its blocks with transparent huge pages (its tunable
                `glibc.malloc.hugetlb=1`): 2 MB pages, 512 times fewer faults (each page still
                zeroed), memory as out of the box. glibc reads the tunable when a process starts,
                so `configure` restarts the script's command with it set (`os.execve`: same
                process id, arguments and environment otherwise; child processes inherit it).
                Needs Linux with transparent huge pages in mode 'always' or 'madvise' and glibc
                2.35 or later.
  'retain'      glibc keeps freed memory for reuse (`retain_freed_memory`: one arena, no mmap, no
                trimming): no faults at all, but XLA compiles 20-50 % slower (its compiler
                threads share the one arena) and the process keeps the most memory it ever held,
                which is more than one step's: XLA frees a step's temporaries on another thread,
                at times after the next step has allocated its own, and the heap keeps room for
                both (and a fragmented third). So the trainer, once its step is compiled, stops
                retaining (`fit_to_memory`) when `RETAINED_STEPS` times the step's temporaries
                would not fit in the memory available.
  'huge_pages+retain'  both (below: never the slowest), and where the trainer stops retaining,
                huge pages remain.
  'default'     glibc as out of the box.
  'auto'        on the CPU 'huge_pages+retain' ('retain' where huge pages are not to be had); on
                GPUs and TPUs 'default' (the step's buffers are device memory there). Decided
                without starting JAX (JAX_PLATFORMS, else whether a GPU/TPU plugin is installed).

Measured on the project's 2-core machine with steps dispatched ahead as the trainer does (time per
step after the first few; peak resident memory), default / huge_pages / retain / huge_pages+retain:
U-Net at 256x256 3.68 / 3.21-3.27 / 3.40 / 3.28-3.34 s, 3.3 / 3.4 / 7.2 / 7.3 GB; U-Net at 128x128
0.96 / 0.93-0.99 / 0.84 / 0.87-0.90 s; EC-CaM-UNet at 128x128 1.36-1.41 / 1.13-1.18 / 1.32 /
1.22-1.27 s. EC-CaM-UNet at the paper's 512x512 (13 GB of temporaries): 30 s out of the box, 22 s
with huge pages (16 GB), while retaining needs more than the machine's 24 GB. Huge pages alone are
fragile, though: when another process takes and returns memory in between (the benchmark's PyTorch
process, out of the box), the kernel compacts memory to find free 2 MB pages, and the JAX step with
huge pages alone took 1.07-1.10 s for the U-Net at 128x128 and 8.2 s for EC-CaM-UNet at 256x256,
against 0.85-0.93 s and 4.5-4.6 s with huge_pages+retain; retained memory is not given back, so it
is not exposed. Hence 'auto' takes both. The demo (README's first command, empty caches / warm): 89
/ 70 s out of the box, 87 / 63 s with huge pages alone, 107 / 63 s with both (retaining slows its
compilations). docs/performance.md has the benchmark tables.

Call `configure` first thing in a script, before JAX starts its threads: the arena setting holds
only for threads that have not allocated yet, and a restart is cheapest before anything is loaded.
"""

import contextlib
import ctypes
import ctypes.util
import os
import sys

from ecm_jax import runtime

# How many steps' temporaries a retaining process may hold at once (module doc: 3 seen).
RETAINED_STEPS = 3

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# glibc's own large-block behaviour, at the largest its adaptive thresholds reach on 64-bit: blocks
# of 32 MB and more mmapped and unmapped on free, the heap top trimmed above 64 MB.
_GLIBC_LARGE_BLOCKS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 64 << 20),
                       (_M_MMAP_MAX, 65536))

_retaining = False  # whether this process retains freed memory now


def _libc():
  """The C library with `mallopt` typed, or None where there is none (macOS, musl)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c'))
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
  except (OSError, AttributeError):
    return None
  return libc


def retain_freed_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse (module doc). True if applied; False where the
  C library has no `mallopt` or refuses the settings (macOS, musl): nothing changes there."""
  global _retaining
  libc = _libc()
  if libc is None:
    return False
  # One arena: other arenas serve large blocks with mmap whatever M_MMAP_MAX says. A trim
  # threshold of -1 is SIZE_MAX to glibc (the parameter is an int, the threshold a size_t):
  # never trim.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  _retaining = all(libc.mallopt(param, value) == 1 for param, value in settings)
  return _retaining


def return_freed_memory() -> bool:
  """Undoes `retain_freed_memory` for large blocks (glibc's own behaviour above 32 MB again) and
  hands what is held free now back to the system. The one arena stays (set before threads start,
  it cannot be undone). True if applied."""
  global _retaining
  libc = _libc()
  if libc is None or not all(libc.mallopt(p, v) == 1 for p, v in _GLIBC_LARGE_BLOCKS):
    return False
  libc.malloc_trim(0)
  _retaining = False
  return True


def available_bytes() -> int | None:
  """Memory the system can still give this process (Linux MemAvailable), None where unknown."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def fit_to_memory(step_temp_bytes: int) -> str | None:
  """Stops retaining if `RETAINED_STEPS` steps' temporaries would not fit in memory (module doc).

  `step_temp_bytes`: the temporaries of one step on this host (XLA's memory analysis of the
  compiled step, summed over local devices). Returns a message saying what was done, or None when
  nothing changes (not retaining, or it fits).
  """
  if not _retaining:
    return None
  available = available_bytes()
  if available is None or RETAINED_STEPS * step_temp_bytes <= available:
    return None
  if not return_freed_memory():
    return None
  gib = 2**30
  return (f'host memory: no longer retaining freed memory: a step\'s temporaries take '
          f'{step_temp_bytes / gib:.1f} GiB and a retaining process can hold {RETAINED_STEPS}x '
          f'that, more than the {available / gib:.1f} GiB available; steps run slower '
          f'(ecm_jax/cpu/host_memory.py)')


_HUGETLB = 'glibc.malloc.hugetlb'  # the glibc tunable (GLIBC_TUNABLES=name=value:name=value)


def _tunables() -> list[str]:
  return [t for t in os.environ.get('GLIBC_TUNABLES', '').split(':') if t]


def huge_pages_requested() -> bool | None:
  """Whether this process's environment asks glibc for huge pages (`glibc.malloc.hugetlb` set to
  a nonzero value); None when it does not say (the tunable is absent)."""
  values = [t.split('=', 1)[1] for t in _tunables() if t.startswith(_HUGETLB + '=')]
  return None if not values else values[-1] not in ('', '0')


def huge_pages_available() -> bool:
  """Whether glibc can back its blocks with transparent huge pages here: Linux with transparent
  huge pages in mode 'always' or 'madvise', and glibc 2.35 or later (its hugetlb tunable)."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      if '[never]' in f.read():
        return False
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    return name == 'glibc' and tuple(map(int, version.split('.')[:2])) >= (2, 35)
  except (OSError, ValueError, AttributeError):  # no such file or confstr name: not Linux/glibc
    return False


def _tunables_with(huge_pages: bool) -> str | None:
  """GLIBC_TUNABLES as this process has it, with the hugetlb tunable set (`huge_pages`) or removed;
  None if nothing is left."""
  tunables = [t for t in _tunables() if not t.startswith(_HUGETLB + '=')]
  tunables += [f'{_HUGETLB}=1'] if huge_pages else []
  return ':'.join(tunables) or None


def _set_tunables(value: str | None) -> None:
  if value is None:
    os.environ.pop('GLIBC_TUNABLES', None)
  else:
    os.environ['GLIBC_TUNABLES'] = value


def restart_with_huge_pages() -> None:
  """Replaces this process by the command that started it, with glibc's huge pages asked for in
  its environment (module doc). Returns only if the restart fails (an OSError from exec)."""
  sys.stdout.flush()
  sys.stderr.flush()
  env = dict(os.environ, GLIBC_TUNABLES=_tunables_with(True))
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    pass


@contextlib.contextmanager
def for_child_processes(mode: str):
  """Within the block, child processes started from this one inherit `mode`'s huge-page setting
  (asked for if `mode` resolves to huge pages and they are available, removed otherwise), so
  that `configure(mode)` in them needs no restart. For the benchmarks' PyTorch process."""
  saved = os.environ.get('GLIBC_TUNABLES')
  _set_tunables(_tunables_with(_wants_huge_pages(mode)))
  try:
    yield
  finally:
    _set_tunables(saved)


def resolve(mode: str) -> str:
  """What host-memory `mode` (one of `runtime.HOST_MEMORY_MODES`, checked by
  `runtime.configure_host_memory` and the flags) does here: the mode itself, or for 'auto': on the
  CPU (`runtime.runs_on_cpu`) 'huge_pages+retain' where `huge_pages_available`, else 'retain';
  'default' elsewhere."""
  if mode != 'auto':
    return mode
  if not runtime.runs_on_cpu():
    return 'default'
  return 'huge_pages+retain' if huge_pages_available() else 'retain'


def _wants_huge_pages(mode: str) -> bool:
  """Whether `mode` resolves to huge pages here and they are available."""
  return 'huge_pages' in resolve(mode).split('+') and huge_pages_available()


def configure(mode: str) -> str:
  """Applies `resolve(mode)` to this process, first thing in a script. Huge pages: restarts the
  script with them asked for, unless its environment already says (set by that restart, by a
  parent process or by the user: left as it is). Returns what is in effect: 'huge_pages' (asked
  for and available, whatever the mode), 'retain', 'huge_pages+retain' or 'default'."""
  if _wants_huge_pages(mode) and huge_pages_requested() is None:
    restart_with_huge_pages()
  in_effect = ['huge_pages'] if huge_pages_requested() and huge_pages_available() else []
  if 'retain' in resolve(mode).split('+') and retain_freed_memory():
    in_effect.append('retain')
  return '+'.join(in_effect) or 'default'
