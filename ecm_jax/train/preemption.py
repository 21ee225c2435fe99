"""Stopping a run on SIGINT/SIGTERM at one step that every process agrees on.

A scheduler that preempts a job (SLURM, a Cloud TPU maintenance event, Kubernetes) sends SIGTERM,
possibly to one host only. Every process must then save the same step and exit, or the others wait
forever in the next collective. In a multi-process job this is JAX's preemption sync manager,
started by `jax.distributed.initialize`: it catches SIGTERM in any process and agrees with the
others, through the coordination service, on the step at which all of them stop; checking for that
step costs nothing until a signal came. SIGINT (Ctrl-C) is passed on to it as SIGTERM. A single
process checks its own flag. A second SIGINT stops at once (KeyboardInterrupt).
"""

import os
import signal

import jax
from jax.experimental import multihost_utils


class StopSignals:
  """Install once per training process; `should_stop(step)` after each step says whether to save
  that step and exit (True on every process at the same step)."""

  def __init__(self):
    self.signal_name = None  # the signal this process received, if any
    self._agreed = jax.process_count() > 1
    signal.signal(signal.SIGINT, self._handle)
    if not self._agreed:  # in a job, JAX's preemption notifier owns SIGTERM
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name
    if self._agreed:
      os.kill(os.getpid(), signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    if self._agreed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal_name is not None

  def reason(self) -> str:
    """What stopped the run, for the log."""
    if self._agreed and self.signal_name is None:
      return 'SIGTERM/SIGINT to a process of the job'
    return self.signal_name or 'SIGTERM'
