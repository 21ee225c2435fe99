"""Timing helpers shared by the benchmark scripts.

This machine is shared and its speed drifts: time candidates interleaved in one process (one call
of each per round), after a warm-up call, and compare medians of the rounds.
"""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def time_interleaved(thunks: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int = 1) -> dict[str, list[float]]:
  """Wall seconds of each call of each thunk; the thunks run round-robin, `repeats` rounds.

  A thunk runs a (compiled) computation and returns its outputs; it is waited for with
  `jax.block_until_ready`. The first `warmup` rounds (compilation, caches) are not recorded.
  """
  times = {name: [] for name in thunks}
  for r in range(warmup + repeats):
    for name, thunk in thunks.items():
      start = time.perf_counter()
      jax.block_until_ready(thunk())
      if r >= warmup:
        times[name].append(time.perf_counter() - start)
  return times


def median(xs: list[float]) -> float:
  return statistics.median(xs)


def measure_gemm_peak(n: int = 2048, repeats: int = 7, dtype=jnp.float32) -> float:
  """This machine's matmul speed in GFLOP/s: median over `repeats` of an n x n x n jitted matmul.

  The reference for "fraction of peak" figures; measure it in the same run as what it is compared
  with (the machine's speed drifts).
  """
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  matmul = jax.jit(jnp.matmul)
  seconds = median(time_interleaved({'gemm': lambda: matmul(a, b)}, repeats)['gemm'])
  return 2 * n**3 / seconds / 1e9
