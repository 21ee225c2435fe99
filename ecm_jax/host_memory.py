"""Host memory: keep freed memory in the process instead of returning it to the kernel.

glibc's malloc serves every block above 32 MB with a fresh mmap and unmaps it on free, and trims
the heap top above 128 KB. A train step allocates and frees gigabytes of such blocks (XLA's
temporaries, PyTorch's activations), so every step faults all of them in again and the kernel
zeroes each 4 KB page first: for the U-Net step at 256x256, batch 4, on XLA:CPU, 0.78 million
page faults and 1.2 s of kernel time per step. With `retain_freed_memory()` (one arena, no mmap,
no trimming) freed blocks are reused. Measured with benchmarks/train_step.py (--host_memory
retain vs default, batch 4): the JAX step at 256x256 is 14 % faster for the U-Net (4.26 -> 3.67 s)
and 29 % for EC-CaM-UNet (7.09 -> 5.02 s), 6-8 % at 128x128; the demo run 15 % (55 -> 47 s).
Costs: the process keeps its peak memory until it exits (a training or inference process
reaches it every step anyway; the demo's peak RSS even fell, 1.28 -> 1.16 GB); XLA compiles
20-50 % slower (its compiler threads share the one arena: the full model's train step 13 -> 18 s).

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

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse (module doc). True if applied; False where the
  C library has no `mallopt` or refuses the settings (macOS, musl): nothing changes there."""
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # One arena: other arenas serve large blocks with mmap whatever M_MMAP_MAX says. A trim
  # threshold of -1 is SIZE_MAX to glibc (the parameter is an int, the threshold a size_t):
  # never trim.
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  return all(mallopt(param, value) == 1 for param, value in settings)


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
