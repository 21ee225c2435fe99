"""Data-parallel scaling of the train step on 1, 2, 4, ... devices: weak and strong; CSV and PNG.

  python benchmarks/scaling.py --config configs/kits.py --variant unet --size 64 \
      --devices 1,2,4 --per_device_batch 2 --global_batch 8 --repeats 3 [--out scaling]

One subprocess per device count N (a process's device count is fixed when jax starts), each
running the product train step (`sharding.jit_train_step` on a mesh over the first N devices: state
replicated and donated, batch sharded) on a synthetic batch from the same random state in every
process (`common.random_train_state`: numpy draws, no initialiser to compile), median step time of
--repeats steps after --warmup:
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

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import (add_config_arguments, command_line,  # noqa: E402
                               compile_train_step, config_from_args, host_summary,
                               markdown_table, median, parse_ints, prepare_process,
                               random_train_state, time_interleaved, write_csv)
from ecm_jax.train import sharding  # noqa: E402
from ecm_jax.data.synthetic import noise_batches  # noqa: E402

LOSS_RTOL = 1e-5  # |loss_N - loss_1| <= LOSS_RTOL * |loss_1|
RESULT_PREFIX = 'RESULT '  # marks the worker's JSON lines on its stdout
MODES = ('weak', 'strong')
HEADER = ('mode', 'devices', 'global batch', 'step s', 'images/s', 'efficiency', 'compile s',
          'loss after 1 step', '|rel. diff| vs 1 device')


# --- worker: one device count, in its own process -------------------------------------------------

def run_worker(args: argparse.Namespace) -> None:
  """Times the step on the first `args.worker` devices for each of `args.global_batches`; prints one
  RESULT JSON line per batch (or one {'skipped': reason} line)."""
  prepare_process(args)
  n = args.worker
  base = {'devices': n, 'platform': jax.default_backend(),
          'device_kind': jax.devices()[0].device_kind}
  if jax.device_count() < n:
    reason = f'{n} devices asked, {jax.device_count()} {base["platform"]} device(s) present'
    print(RESULT_PREFIX + json.dumps(dict(base, skipped=reason)), flush=True)
    return
  mesh = sharding.make_mesh(jax.devices()[:n])
  start = None  # the initial state on the host (it does not depend on the batch size)
  for global_batch in args.global_batches:
    config = config_from_args(args, batch=global_batch)
    if start is None:
      start = random_train_state(config)
    step = compile_train_step(config, mesh, noise_batches(config, 1)[0],
                              sharding.replicate(start, mesh))
    times = time_interleaved({'step': step.step}, args.repeats, args.warmup)['step']
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


def run_devices(argv: list[str], devices: int, global_batches: list[int]) -> list[dict]:
  """The worker's results for `devices` devices and each global batch: this script with the
  parent's arguments `argv` (stderr passes through)."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv, '--worker',
             str(devices), '--global_batches', ','.join(map(str, global_batches))]
  out = subprocess.run(command, env=worker_env(devices), stdout=subprocess.PIPE, text=True,
                       check=True).stdout
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


def run_parent(args: argparse.Namespace, argv) -> list[dict]:
  """Runs a worker per device count, writes the CSV and PNG, prints the table; returns the rows."""
  devices = sorted(set(args.devices) | {1})
  batches = plan(devices, args.per_device_batch, args.global_batch)
  # The 1-device worker also runs every other count's global batch: the loss references.
  needed = {n: sorted(set(modes.values())) for n, modes in batches.items()}
  needed[1] = sorted({b for modes in batches.values() for b in modes.values()})
  results, skipped = {}, []
  for n in devices:
    print(f'scaling: {n} device(s), global batches {needed[n]}', file=sys.stderr, flush=True)
    worker = run_devices(sys.argv[1:] if argv is None else list(argv), n, needed[n])
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
  title = (f'{args.variant} {args.size}x{args.size}, weak: {args.per_device_batch}/device, strong: '
           f'global {args.global_batch}; {devices_note}')
  csv_path, png_path = pathlib.Path(f'{args.out}.csv'), pathlib.Path(f'{args.out}.png')
  write_csv(csv_path, rows)
  plot(rows, title, png_path)
  print(f'\n# Scaling of the train step: {title}')
  if simulated:
    print('NOTE: the devices are simulated on the CPU and share its cores; N devices cannot be '
          'faster than 1. This run checks correctness (loss vs 1 device) and overhead only.')
  print(f'{host_summary()}; median of {args.repeats} steps after {args.warmup} warm-up; loss '
        f'check |loss_N - loss_1| <= {LOSS_RTOL:g} x |loss_1|')
  print(command_line('scaling.py', argv) + '\n')
  print(markdown_table(HEADER, [
      (r['mode'], r['devices'], r['global_batch'], f"{r['step_s']:.3f}",
       f"{r['images_per_s']:.2f}", f"{r['efficiency']:.2f}", f"{r['compile_s']:.1f}",
       f"{r['loss_after_step']:.6f}", f"{r['loss_rel_diff']:.1e}"
       + ('' if r['loss_ok'] else ' FAILED')) for r in rows]))
  for line in skipped:
    print(line)
  print(f'\nWrote {csv_path} and {png_path}')
  return rows


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  add_config_arguments(p, variant='unet', size=64, variant_help='a row of configs/default.VARIANTS')
  p.add_argument('--devices', type=parse_ints, default=(1, 2, 4), help='device counts')
  p.add_argument('--per_device_batch', type=int, default=2, help='weak scaling: batch per device')
  p.add_argument('--global_batch', type=int, default=8, help='strong scaling: global batch')
  p.add_argument('--repeats', type=int, default=3, help='timed steps (median)')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps first (at least 1)')
  p.add_argument('--out', default='scaling', help='writes <out>.csv and <out>.png')
  p.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument('--global_batches', type=parse_ints, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.warmup < 1 or args.repeats < 1:
    p.error('--warmup and --repeats must be at least 1 (the loss check reads the second step)')
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.worker is not None:
    return run_worker(args)
  return run_parent(args, argv)


if __name__ == '__main__':
  main()
