"""Host memory: keep freed memory in the process instead of returning it to the kernel.

glibc's malloc serves every block above 32 MB with a fresh mmap and unmaps it on free, and trims
the heap top above 128 KB. A train step allocates and frees gigabytes of such blocks (XLA's
temporaries, PyTorch's activations), so every step faults all of them in again and the kernel
zeroes each 4 KB page first: for the U-Net step at 256x256, batch 4, on XLA:CPU, 0.78 million
page faults and 1.2 s of kernel time per step. With `retain_freed_memory()` (one arena, no mmap,
no trimming) freed blocks are reused. Measured with benchmarks/train_step.py (--host_memory
retain vs default, batch 4): the JAX step at 256x256 is 14 % faster for the U-Net (4.26 -> 3.67 s)
and 29 % for EC-CaM-UNet (7.09 -> 5.02 s), 6-8 % at 128x128; the demo run 15 % (55 -> 47 s).
Costs: XLA compiles 20-50 % slower (its compiler threads share the one arena: the full model's
train step 13 -> 18 s), and the process keeps the most memory it ever held, which is more than
one step's: XLA frees a step's temporaries on another thread, at times after the next step has
allocated its own, and the heap keeps room for both (and a fragmented third) from then on. With
steps dispatched ahead, as in training, the U-Net at 256x256 (2 GB of temporaries) settles at
7.2 GB resident vs 3.4 GB out of the box, and EC-CaM-UNet at 512x512 (13 GB) is killed for want
of memory on a 24 GB machine, where out of the box it holds 15-16 GB. So the trainer, once its
step is compiled, stops retaining (`fit_to_memory`) when `RETAINED_STEPS` times the step's
temporaries would not fit in the memory available. (Small runs gain both ways: the demo's peak
RSS fell, 1.28 -> 1.16 GB.)

This is what `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>` do when set
before a process starts; `mallopt` does it from inside the process. It holds for threads that
have not allocated yet, so call it first thing (train.py and eval.py do, before JAX creates its
threads; called after the first compilation it no longer helps).

On GPUs and TPUs the step's buffers are device memory, so retaining host memory gains nothing
there and would only slow compilation: mode 'auto' (`resolve`) retains only when JAX will run on the
CPU, decided without starting JAX (JAX_PLATFORMS, else whether a GPU/TPU plugin is installed).
"""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

MODES = ('auto', 'retain', 'default')
# The --host_memory help of train.py, eval.py and the benchmarks.
FLAG_HELP = ('retain: keep freed host memory for reuse (no page faults on every step\'s buffers: '
             '10-50 % faster steps on CPU, slower compiles); auto: retain when running on the '
             'CPU; default: the C library\'s behaviour (ecm_jax.host_memory).')

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
          f'(ecm_jax/host_memory.py)')


def accelerator_plugin_installed() -> bool:
  """Whether JAX can find a GPU or TPU backend here (a PJRT plugin or libtpu), without starting
  JAX (which would create the threads `retain_freed_memory` must precede)."""
  return bool(importlib.metadata.entry_points(group='jax_plugins')
              or importlib.util.find_spec('jax_plugins') or importlib.util.find_spec('libtpu'))


def resolve(mode: str) -> str:
  """'retain' or 'default' for host-memory `mode`: 'retain', 'default', or 'auto' = 'retain' when
  JAX will run on the CPU (JAX_PLATFORMS is 'cpu', or unset with no GPU/TPU plugin installed)."""
  if mode not in MODES:
    raise ValueError(f'host memory mode must be one of {MODES}, got {mode!r}')
  if mode != 'auto':
    return mode
  platforms = os.environ.get('JAX_PLATFORMS', '')
  on_cpu = platforms == 'cpu' or (not platforms and not accelerator_plugin_installed())
  return 'retain' if on_cpu else 'default'


def configure(mode: str) -> bool:
  """Applies `resolve(mode)`; returns whether freed memory is now retained."""
  return resolve(mode) == 'retain' and retain_freed_memory()
