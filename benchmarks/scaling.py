"""Data-parallel scaling of the train step on 1, 2, 4, ... devices: weak and strong; CSV and PNG.

  python -m benchmarks.scaling --config configs/kits.py:unet --size 64 \
      --devices 1,2,4 --per_device_batch 2 --global_batch 8 --repeats 3 [--out scaling] \
      [--features 64,128,256,512,1024] [--conv_impl auto] [--host_memory auto]

(from the repository root; the variant after the colon is a row of configs/default.VARIANTS,
and `--config.key=value` overrides fields of the config file).

One subprocess per device count N (a process's device count is fixed when jax starts), each
(`python -m benchmarks.scaling --worker N ...` from the repository root, the parent's config on its
stdin) running the product train step (`sharding.jit_train_step` on a mesh over the first N
devices: state replicated and donated, batch sharded) on a synthetic batch from the same random
state in every process (`common.random_train_state`: numpy draws, no initialiser to compile),
median step time of --repeats steps after --warmup:
  weak    per-device batch fixed (--per_device_batch): global batch N x per-device batch;
  strong  global batch fixed (--global_batch; device counts that do not divide it are skipped).
Efficiency = images/s on N devices / (N x images/s on 1 device), per mode (1.0 = linear scaling).
N = 1 always runs: it is the baseline, and the reference of the correctness check: the loss after
one step (the loss the second step reports) on N devices must equal the 1-device loss for the same
global batch and initial state to LOSS_RTOL (BatchNorm statistics are those of the global batch,
so data parallelism changes only the order of float32 sums).

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=N, set for each
subprocess before jax is imported): they share the same cores, so this is a correctness and
overhead check, not a speed-up claim. On GPUs/TPUs the real devices are used unchanged; device
counts beyond the real count are skipped with a message.
Writes <out>.csv (one row per mode and device count) and <out>.png (images/s and efficiency).
"""

from collections.abc import Sequence
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import ml_collections

from benchmarks.common import (
  benchmark_config,
  compile_train_step,
  host_summary,
  median,
  random_train_state,
  time_interleaved,
  write_csv,
)
from ecm_jax import tables
from ecm_jax.data.synthetic import noise_batches
from ecm_jax.train import sharding

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]  # the workers' working directory
LOSS_RTOL = 1e-5  # |loss_N - loss_1| <= LOSS_RTOL * |loss_1|
RESULT_PREFIX = 'RESULT '  # marks the worker's JSON lines on its stdout
MODES = ('weak', 'strong')
HEADER = ('mode', 'devices', 'global batch', 'step s', 'images/s', 'efficiency', 'compile s',
          'loss after 1 step', '|rel. diff| vs 1 device')
ALIGN = 'lrrrrrrrr'


# --- worker: one device count, in its own process -------------------------------------------------

def run_worker(config: ml_collections.ConfigDict, n: int, global_batches: Sequence[int], *,
               repeats: int, warmup: int) -> None:
  """Times the step of `config` on the first `n` devices for each of `global_batches`; prints one
  RESULT JSON line per batch (or one {'skipped': reason} line)."""
  base = {'devices': n, 'platform': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind}
  if jax.device_count() < n:
    reason = f'{n} devices asked, {jax.device_count()} {base["platform"]} device(s) present'
    print(RESULT_PREFIX + json.dumps(dict(base, skipped=reason)), flush=True)
    return
  mesh = sharding.make_mesh(jax.devices()[:n])
  start = None  # the initial state on the host (it does not depend on the batch size)
  for global_batch in global_batches:
    batch_config = benchmark_config(config, batch=global_batch)
    if start is None:
      start = random_train_state(batch_config)
    step = compile_train_step(batch_config, mesh, noise_batches(batch_config, 1)[0],
                              sharding.replicate(start, mesh))
    times = time_interleaved({'step': step.step}, repeats, warmup)['step']
    print(RESULT_PREFIX + json.dumps(dict(
        base, global_batch=global_batch, step_s=median(times), compile_s=step.compile_seconds,
        loss_after_step=float(step.losses[1]))), flush=True)


# --- parent: plan, run the workers, report -------------------------------------------------------

def plan(devices: list[int], per_device_batch: int, global_batch: int) -> dict[int, dict[str, int]]:
  """{N: {mode: global batch}}; strong is left out where N does not divide the global batch."""
  batches = {}
  for n in devices:
    batches[n] = {'weak': n * per_device_batch}
    if global_batch % n == 0:
      batches[n]['strong'] = global_batch
  return batches


def worker_env(devices: int) -> dict[str, str]:
  """This process's environment with `devices` simulated host (CPU) devices (ignored by GPU and
  TPU backends)."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return env


def run_devices(config: ml_collections.ConfigDict, devices: int, global_batches: list[int], *,
                repeats: int, warmup: int, host_memory_mode: str) -> list[dict]:
  """The worker's results for `devices` devices and each global batch: `python -m
  benchmarks.scaling --worker ...` from the repository root, `config` pickled on its stdin, its
  host allocator `host_memory_mode` (stderr passes through)."""
  command = [sys.executable, '-m', 'benchmarks.scaling', '--worker', str(devices),
             '--global_batches', ','.join(map(str, global_batches)), '--repeats', str(repeats),
             '--warmup', str(warmup), '--host_memory', host_memory_mode]
  out = subprocess.run(command, input=pickle.dumps(config.to_dict()), env=worker_env(devices),
                       cwd=REPO_ROOT, stdout=subprocess.PIPE, check=True).stdout.decode()
  return [json.loads(line[len(RESULT_PREFIX):]) for line in out.splitlines()
          if line.startswith(RESULT_PREFIX)]


def scaling_rows(batches: dict[int, dict[str, int]],
                 results: dict[int, dict[int, dict]]) -> list[dict]:
  """CSV rows per mode and device count, from {N: {global batch: worker result}}."""
  rows = []
  for mode in MODES:
    base = results[1][batches[1][mode]] if mode in batches[1] else None
    for n, modes in batches.items():
      if mode not in modes or modes[mode] not in results.get(n, {}):
        continue
      global_batch = modes[mode]
      r, reference = results[n][global_batch], results[1][global_batch]
      images_per_s = global_batch / r['step_s']
      rel_diff = abs(r['loss_after_step'] - reference['loss_after_step']) / abs(
          reference['loss_after_step'])
      rows.append({
          'mode': mode, 'devices': n, 'global_batch': global_batch,
          'per_device_batch': global_batch // n, 'step_s': r['step_s'],
          'images_per_s': images_per_s,
          'efficiency': images_per_s / (n * base['global_batch'] / base['step_s']),
          'compile_s': r['compile_s'], 'loss_after_step': r['loss_after_step'],
          'loss_after_step_1_device': reference['loss_after_step'], 'loss_rel_diff': rel_diff,
          'loss_ok': rel_diff <= LOSS_RTOL, 'platform': r['platform'],
          'device_kind': r['device_kind']})
  return rows


def plot(rows: list[dict], title: str, path: pathlib.Path) -> None:
  """images/s (with linear scaling from 1 device, dashed) and efficiency against device count."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (speed, efficiency) = plt.subplots(1, 2, figsize=(10, 4))
  for mode, color in zip(MODES, ('tab:blue', 'tab:orange')):
    mode_rows = [r for r in rows if r['mode'] == mode]
    if not mode_rows:
      continue
    n = [r['devices'] for r in mode_rows]
    speed.plot(n, [r['images_per_s'] for r in mode_rows], 'o-', color=color, label=mode)
    speed.plot(n, [d * mode_rows[0]['images_per_s'] for d in n], '--', color=color, alpha=0.5,
               label=f'{mode}, linear')
    efficiency.plot(n, [r['efficiency'] for r in mode_rows], 'o-', color=color, label=mode)
  for ax, label in ((speed, 'images/s'), (efficiency, 'efficiency (1 = linear)')):
    ax.set_xscale('log', base=2)
    ax.set_xticks(sorted({r['devices'] for r in rows}), map(str, sorted({r['devices'] for r in rows})))
    ax.set_xlabel('devices')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  efficiency.set_ylim(bottom=0)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_parent(config: ml_collections.ConfigDict, *, devices: Sequence[int] = (1, 2, 4),
               per_device_batch: int = 2, global_batch: int = 8, repeats: int = 3,
               warmup: int = 1, out: str | os.PathLike = 'scaling',
               host_memory_mode: str = 'default', command: str | None = None) -> list[dict]:
  """Runs a worker per device count for `config` (host allocator `host_memory_mode`), writes
  <out>.csv and <out>.png, prints the table (after the command line `command`, if given); returns
  the rows."""
  if warmup < 1 or repeats < 1:
    raise ValueError('warmup and repeats must be at least 1 (the loss check reads the second '
                     'step)')
  devices = sorted(set(devices) | {1})
  batches = plan(devices, per_device_batch, global_batch)
  # The 1-device worker also runs every other count's global batch: the loss references.
  needed = {n: sorted(set(modes.values())) for n, modes in batches.items()}
  needed[1] = sorted({b for modes in batches.values() for b in modes.values()})
  results, skipped = {}, []
  for n in devices:
    print(f'scaling: {n} device(s), global batches {needed[n]}', file=sys.stderr, flush=True)
    worker = run_devices(config, n, needed[n], repeats=repeats, warmup=warmup,
                         host_memory_mode=host_memory_mode)
    if 'skipped' in worker[0]:
      skipped.append(f'{n} devices: skipped ({worker[0]["skipped"]})')
      continue
    results[n] = {r['global_batch']: r for r in worker}
  rows = scaling_rows(batches, results)
  platform = rows[0]['platform']
  simulated = platform == 'cpu'
  devices_note = (f'simulated CPU devices sharing the same {os.cpu_count()} cores: a correctness '
                  f'and overhead check, not a speed-up claim' if simulated
                  else f'{platform} devices ({rows[0]["device_kind"]})')
  size = config.data.image_size
  title = (f'{config.variant} {size}x{size}, weak: {per_device_batch}/device, strong: '
           f'global {global_batch}; {devices_note}')
  csv_path, png_path = pathlib.Path(f'{out}.csv'), pathlib.Path(f'{out}.png')
  write_csv(csv_path, rows)
  plot(rows, title, png_path)
  print(f'\n# Scaling of the train step: {title}')
  if simulated:
    print('NOTE: the devices are simulated on the CPU and share its cores; N devices cannot be '
          'faster than 1. This run checks correctness (loss vs 1 device) and overhead only.')
  print(f'{host_summary()}; median of {repeats} steps after {warmup} warm-up; loss '
        f'check |loss_N - loss_1| <= {LOSS_RTOL:g} x |loss_1|')
  if command is not None:
    print(command + '\n')
  print(tables.markdown_table(HEADER, [
      (r['mode'], r['devices'], r['global_batch'], f"{r['step_s']:.3f}",
       f"{r['images_per_s']:.2f}", f"{r['efficiency']:.2f}", f"{r['compile_s']:.1f}",
       f"{r['loss_after_step']:.6f}", f"{r['loss_rel_diff']:.1e}"
       + ('' if r['loss_ok'] else ' FAILED')) for r in rows], ALIGN))
  for line in skipped:
    print(line)
  print(f'\nWrote {csv_path} and {png_path}')
  return rows


if __name__ == '__main__':
  from absl import flags

  from benchmarks.common import command_line, define_config_flags, define_int_list
  from ecm_jax import cli
  from ecm_jax.errors import UserError

  _CONFIG = define_config_flags(config='configs/kits.py:unet', size=64)
  _DEVICES = define_int_list('devices', '1,2,4', 'device counts')
  _PER_DEVICE_BATCH = flags.DEFINE_integer('per_device_batch', 2,
                                           'weak scaling: batch per device')
  _GLOBAL_BATCH = flags.DEFINE_integer('global_batch', 8, 'strong scaling: global batch')
  _REPEATS = flags.DEFINE_integer('repeats', 3, 'timed steps (median)', lower_bound=1)
  _WARMUP = flags.DEFINE_integer('warmup', 1, 'untimed steps first (at least 1: the loss check '
                                 'reads the second step)', lower_bound=1)
  _OUT = flags.DEFINE_string('out', 'scaling', 'writes <out>.csv and <out>.png')
  # The worker of one device count (`run_devices`), its config on stdin.
  _WORKER = flags.DEFINE_integer('worker', None, 'internal: run as the worker of this many devices')
  _GLOBAL_BATCHES = define_int_list('global_batches', None,
                                    "internal: the worker's global batches")

  def main(argv):
    del argv
    if _WORKER.value is not None:
      config = ml_collections.ConfigDict(pickle.load(sys.stdin.buffer))
      run_worker(config, _WORKER.value, _GLOBAL_BATCHES.value, repeats=_REPEATS.value,
                 warmup=_WARMUP.value)
    else:
      run_parent(_CONFIG.get(), devices=_DEVICES.value, per_device_batch=_PER_DEVICE_BATCH.value,
                 global_batch=_GLOBAL_BATCH.value, repeats=_REPEATS.value, warmup=_WARMUP.value,
                 out=_OUT.value, host_memory_mode=cli.HOST_MEMORY.value,
                 command=command_line('scaling'))

  cli.run(main, UserError, compilation_cache=False)  # compile times are measured
