"""The device check: everything that needs an accelerator, in one run, into one markdown report.

  benchmarks/device_check.sh [--smoke] [--report device_check.md] [--budget 450]
  (the script sets the environment, installs carried wheels if needed, and runs this module:
   python -m benchmarks.device_check ...)

Sections (each one's failure is reported and the run goes on; sections past --budget seconds are
marked skipped):
  1. tests     the test modules that behave differently on an accelerator (precision, remat,
               data-parallel training, conv kernels), run with pytest on this backend;
  2. parity    the JAX-vs-PyTorch numerics report (`ecm_jax.torch_ref.parity`, matmul precision
               'highest'), JAX on this backend, PyTorch on the CPU;
  3. step      the product train step at --size for U-Net and EC-CaM-UNet, float32 and bfloat16,
               remat none and blocks: images/s, step ms, compile s, XLA's buffers and the device's
               peak, MFU (XLA's FLOP count / step time against the chip's spec peak and against a
               bf16 matmul measured in the same run); beside it the PyTorch reference step on the
               same chip (float32, and AMP bfloat16, channels_last) and the JAX/PyTorch ratios;
  4. scaling   `benchmarks.scaling` over the devices present (1, 2, 4, ... up to the count);
  5. input     the input pipeline's augmented slices/s at --size (`benchmarks.input_pipeline`),
               against what the step consumes (the EC-CaM-UNet float32 images/s of section 3).
--smoke runs every section on the CPU at a tiny size (small widths, 32x32, 1-2 steps) in a few
minutes: tests/test_device_check.py runs it, so the script cannot rot between device loans.
"""

from collections.abc import Callable
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from benchmarks import input_pipeline
from benchmarks.common import benchmark_config, compile_train_step, initial_state
from configs import default
from ecm_jax import tables
from ecm_jax.data.synthetic import noise_batches
from ecm_jax.train import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]
# Dense peak TFLOP/s from the vendors' data sheets (bf16 tensor cores / MXU; float32 as the
# default precision computes it: TF32 on NVIDIA, bf16 passes on TPU). Matched by substring of
# `device_kind`; the measured bf16 matmul of the same run is reported beside it.
SPEC_PEAK_TFLOPS = {  # kind: (bf16, float32 at default precision)
    'H200': (989.0, 494.0), 'H100': (989.0, 494.0), 'A100': (312.0, 156.0), 'L40S': (362.0, 181.0),
    'L4': (121.0, 60.0), 'A10': (125.0, 62.5), 'V100': (125.0, 15.7),
    'TPU v6': (918.0, 918.0), 'TPU v5p': (459.0, 459.0), 'TPU v5': (197.0, 197.0),
    'TPU v4': (275.0, 275.0),
}
SMOKE_MODEL = dict(features=(4, 8, 16, 32, 64), mus_channels=8, side_features=(8, 8, 4),
                   cc_hidden=4, conv_impl='xla')
FULL_COMBOS = (('float32', 'none'), ('float32', 'blocks'), ('bfloat16', 'none'),
               ('bfloat16', 'blocks'))
DEVICE_TESTS = ('tests/test_precision.py', 'tests/test_remat.py', 'tests/test_training.py',
                'tests/test_ops.py')


def spec_peak(kind: str) -> tuple[float, float] | None:
  """(bf16, float32) spec peak TFLOP/s of a device kind, None if unknown."""
  for name, peak in SPEC_PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


class Report:
  """Sections of markdown, a time budget, and failures kept as text."""

  def __init__(self, budget_s: float, path: str, title: str, flags: str):
    self.start, self.budget_s, self.parts = time.perf_counter(), budget_s, []
    self.path, self.title, self.flags = path, title, flags

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over_budget(self) -> bool:
    return self.elapsed() > self.budget_s

  def section(self, title: str, fn: Callable[[], str]) -> None:
    print(f'== {title} ({self.elapsed():.0f} s)', file=sys.stderr, flush=True)
    if self.over_budget():
      body = f'Skipped: the run had used {self.elapsed():.0f} s of its {self.budget_s:.0f} s budget.'
    else:
      start = time.perf_counter()
      try:
        body = fn()
      except Exception:  # pylint: disable=broad-except  (one section's failure is its result)
        body = 'FAILED:\n\n```\n' + traceback.format_exc()[-4000:] + '```'
      body += f'\n\n({time.perf_counter() - start:.0f} s)'
    self.parts.append(f'## {title}\n\n{body}\n')
    self.write()

  def text(self) -> str:
    return (f'# Device check ({self.title})\n\n`benchmarks/device_check.sh {self.flags}`: '
            f'{self.elapsed():.0f} s so far.\n\n' + '\n'.join(self.parts))

  def write(self) -> None:
    """Rewrites the report after every section: a run stopped from outside keeps what it did."""
    pathlib.Path(self.path).write_text(self.text())


def _run_command(args: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
  """(exit status, stdout + stderr) of a subprocess from the repository root."""
  try:
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    return done.returncode, done.stdout + done.stderr
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    return 124, out + f'\n(timed out after {timeout:.0f} s)'


def _gib(value: float) -> str:
  return '-' if value != value else f'{value:.2f}'  # NaN: the backend keeps no peak


def _tail(text: str, lines: int) -> str:
  return '\n'.join(text.strip().splitlines()[-lines:])


# --- sections ------------------------------------------------------------------------------------

def machine(smoke: bool) -> str:
  devices = jax.devices()
  lines = [f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
           f'- host: {platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, Python '
           f'{platform.python_version()}',
           f'- jax {jax.__version__}, backend {jax.default_backend()}, {len(devices)} device(s): '
           f'{devices[0].device_kind}',
           f'- mode: {"--smoke (CPU, tiny sizes: checks the script, measures nothing)" if smoke else "full"}']
  try:
    import torch  # pylint: disable=g-import-not-at-top
    cuda = torch.cuda.is_available()
    lines.append(f'- torch {torch.__version__}, CUDA available: {cuda}'
                 + (f' ({torch.cuda.get_device_name(0)})' if cuda else ''))
  except ImportError:
    lines.append('- torch: not installed')
  commit = _run_command(['git', 'rev-parse', '--short', 'HEAD'], 10)[1].strip()
  lines.append(f'- commit: {commit or "unknown"}')
  return '\n'.join(lines)


def tests(smoke: bool) -> str:
  if smoke:
    return ('Skipped in --smoke: the suite runs these modules on the CPU anyway '
            f'({", ".join(DEVICE_TESTS)}).')
  code, out = _run_command([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                            *DEVICE_TESTS], timeout=240)
  return f'`pytest -q {" ".join(DEVICE_TESTS)}`: exit {code}\n\n```\n{_tail(out, 25)}\n```'


def parity(smoke: bool) -> str:
  args = [sys.executable, '-m', 'ecm_jax.torch_ref.parity', '--config',
          'configs/demo.py:unet' if smoke else 'configs/demo.py',
          '--config.data.image_size=32' if smoke else '--config.data.image_size=64',
          '--config.train.batch_size=2', '--steps', '1' if smoke else '3']
  if smoke:
    args += [f'--config.model.{k}={v}' for k, v in SMOKE_MODEL.items()]
  code, out = _run_command(args, timeout=180)
  return f'`{" ".join(args[1:])}`: exit {code}\n\n{_tail(out, 60)}'


def _bf16_matmul_tflops(smoke: bool) -> float:
  n = 512 if smoke else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, a))
  reps = 3 if smoke else 20
  start = time.perf_counter()
  for _ in range(reps):
    out = matmul(a, a)
  jax.block_until_ready(out)
  return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def _time(fn: Callable[[], object], warmup: int, repeats: int,
          sync: Callable[[object], object]) -> float:
  for _ in range(warmup):
    sync(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  sync(out)
  return (time.perf_counter() - start) / repeats


def jax_step_row(config, warmup: int, repeats: int) -> dict:
  mesh = sharding.make_mesh()
  batch = noise_batches(config, 1)[0]
  step = compile_train_step(config, mesh, batch, initial_state(config, mesh))
  seconds = _time(step.step, warmup, repeats, jax.block_until_ready)
  stats = jax.devices()[0].memory_stats() or {}
  return {'seconds': seconds, 'compile_s': step.compile_seconds, 'flops': step.flops(),
          'xla_gib': step.memory_bytes() / 2**30,
          'peak_gib': stats.get('peak_bytes_in_use', float('nan')) / 2**30,
          'loss': float(step.losses[0])}


def torch_step_row(config, amp: bool, warmup: int, repeats: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  from ecm_jax.torch_ref import models, training  # pylint: disable=g-import-not-at-top
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = models.build_torch_model(config.model).to(device, memory_format=torch.channels_last)
  optimizer, scheduler = training.make_optimizer(model, config, 1000)
  batch = noise_batches(config, 1)[0]
  image = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy()).to(device)
  inputs = {'image': image.contiguous(memory_format=torch.channels_last),
            'label': torch.from_numpy(batch['label']).long().to(device)}

  def one_step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
      return training.train_step(model, optimizer, scheduler, inputs, config.loss)

  sync = (lambda _: torch.cuda.synchronize()) if device == 'cuda' else (lambda _: None)
  if device == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  seconds = _time(one_step, warmup, repeats, sync)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else float('nan')
  return {'seconds': seconds, 'peak_gib': peak}


def train_steps(smoke: bool, size: int, per_device_batch: int, report: Report) -> tuple[str, dict]:
  """The step table; returns (markdown, {(variant, dtype, remat): images/s})."""
  n = jax.device_count()
  kind = jax.devices()[0].device_kind
  peak = spec_peak(kind)
  measured = _bf16_matmul_tflops(smoke)
  warmup, repeats = (1, 1) if smoke else (2, 10)
  rows, rates, torch_rates = [], {}, {}
  for variant in ('unet', 'ec_cam_unet'):
    config = benchmark_config(default.get_config(), variant=variant, size=size,
                              batch=per_device_batch * n)
    combos = FULL_COMBOS
    if smoke:
      config.model.update(SMOKE_MODEL)
      # Minutes, not more: float32 and bf16+remat for U-Net, float32 for the full model.
      combos = (FULL_COMBOS[0], FULL_COMBOS[3]) if variant == 'unet' else FULL_COMBOS[:1]
    for dtype, remat in combos:
      if report.over_budget():
        rows.append((variant, 'JAX', dtype, remat) + ('skipped: budget',) + ('-',) * 7)
        continue
      config.model.dtype, config.model.remat = dtype, remat
      try:
        r = jax_step_row(config, warmup, repeats)
      except Exception as e:  # pylint: disable=broad-except
        rows.append((variant, 'JAX', dtype, remat, f'FAILED: {type(e).__name__}: {str(e)[:200]}')
                    + ('-',) * 7)
        continue
      rate = config.train.batch_size / r['seconds']
      rates[variant, dtype, remat] = rate
      tflops = r['flops'] / r['seconds'] / 1e12
      spec = '-' if peak is None else f"{100 * tflops / n / peak[dtype == 'float32']:.1f}"
      rows.append((variant, 'JAX', dtype, remat, f'{rate:.1f}', f"{1e3 * r['seconds']:.1f}",
                   f"{r['compile_s']:.0f}", f"{r['xla_gib']:.3f}", _gib(r['peak_gib']), spec,
                   f'{100 * tflops / n / measured:.1f}', ''))
    config.model.remat = 'none'
    for amp in ((False,) if smoke and variant != 'unet' else (False, True)):
      dtype = 'AMP bf16' if amp else 'float32'
      if report.over_budget():
        rows.append((variant, 'PyTorch', dtype, '-', 'skipped: budget') + ('-',) * 7)
        continue
      try:
        r = torch_step_row(config, amp, warmup, repeats)
      except Exception as e:  # pylint: disable=broad-except
        rows.append((variant, 'PyTorch', dtype, '-', f'FAILED: {type(e).__name__}: {str(e)[:200]}')
                    + ('-',) * 7)
        continue
      rate = config.train.batch_size / r['seconds']
      torch_rates[variant, amp] = rate
      rows.append((variant, 'PyTorch', dtype, 'none', f'{rate:.1f}', f"{1e3 * r['seconds']:.1f}",
                   '-', '-', _gib(r['peak_gib']), '-', '-', ''))
  # JAX / PyTorch throughput ratios (> 1: JAX faster), remat none against the same precision.
  for i, row in enumerate(rows):
    if row[1] == 'JAX' and row[3] == 'none':
      t = torch_rates.get((row[0], row[2] == 'bfloat16'))
      j = rates.get((row[0], row[2], 'none'))
      if t and j:
        rows[i] = row[:-1] + (f'{j / t:.2f}',)
  header = ('variant', 'framework', 'dtype', 'remat', 'images/s', 'step ms', 'compile s',
            'XLA buffers GiB', 'device peak GiB', 'MFU % spec', 'MFU % measured', 'JAX/PyTorch')
  text = (f'{size}x{size}, batch {per_device_batch} per device x {n} device(s) ({kind}); '
          f'mean of {repeats} steps after {warmup} warm-up. MFU: XLA\'s FLOP count '
          f'per step / step time / device count, against the spec peak '
          f'({"unknown kind" if peak is None else f"{peak[0]:g} TFLOP/s bf16, {peak[1]:g} float32"}) '
          f'and against a bf16 matmul measured now ({measured:.1f} TFLOP/s). PyTorch: channels_last, '
          f'float32 or AMP bfloat16 (autocast), its own random weights; its peak is '
          f'`torch.cuda.max_memory_allocated`. JAX/PyTorch: images/s ratio (> 1: JAX faster).\n\n')
  return text + tables.markdown_table(header, rows, 'llllrrrrrrrr'), rates


def scaling(smoke: bool, size: int) -> str:
  n = jax.device_count()
  counts = [c for c in (1, 2, 4, 8, 16, 32, 64) if c <= max(n, 2 if smoke else 1)]
  out_dir = pathlib.Path(os.environ.get('DEVICE_CHECK_OUT', '/tmp'))
  args = [sys.executable, '-m', 'benchmarks.scaling', '--config',
          'configs/kits.py:unet' if smoke else 'configs/kits.py:ec_cam_unet',
          '--size', str(size), '--devices', ','.join(map(str, counts)), '--per_device_batch', '2',
          '--global_batch', str(2 * max(counts)), '--repeats', '1' if smoke else '5',
          '--out', str(out_dir / 'device_check_scaling')]
  if smoke:
    args += ['--features', ','.join(map(str, SMOKE_MODEL['features'])),
             '--config.model.mus_channels=8', '--config.model.side_features=(8, 8, 4)',
             '--config.model.cc_hidden=4', '--conv_impl', 'xla']
  code, out = _run_command(args, timeout=240)
  note = ('' if n > 1 or smoke else
          'One device present: the 1-device row is the baseline of a later multi-device run; '
          'compare with the projection in docs/accelerators.md.\n\n')
  return note + f'`{" ".join(args[1:])}`: exit {code}\n\n{_tail(out, 20)}'


def input_rate(smoke: bool, size: int, rates: dict) -> str:
  from ecm_jax.config import resolve_num_workers  # pylint: disable=g-import-not-at-top
  auto = resolve_num_workers(-1)
  workers = sorted({0, auto}) if smoke else sorted({0, 1, auto})
  consumption = (rates.get(('ec_cam_unet', 'float32', 'none'))
                 or rates.get(('unet', 'float32', 'none')))
  rows = input_pipeline.run(workers, batches=2 if smoke else 12, size=size, consumption=consumption)
  best = max(rate for _, rate, _ in rows)
  lines = [f'Workers: {", ".join(map(str, workers))}; the auto default is {auto} on this host '
           f'(`ecm_jax.config.resolve_num_workers`).', '',
           tables.markdown_table(('workers', 'slices/s', 'first batch s'),
                                 [(w, f'{r:.1f}', f'{f:.1f}') for w, r, f in rows], 'rrr')]
  if consumption:
    lines += ['', f'The EC-CaM-UNet float32 step consumes {consumption:.1f} images/s on all '
              f'devices; the best input rate is {best:.1f} slices/s: '
              + ('input-bound.' if best < consumption else 'the input keeps up.')]
  return '\n'.join(lines)


def main(smoke: bool, report_path: str, budget_s: float, size: int | None,
         per_device_batch: int) -> int:
  size = size or (32 if smoke else 512)
  title = 'smoke, CPU' if smoke else jax.devices()[0].device_kind
  report = Report(budget_s, report_path, title, ' '.join(sys.argv[1:]))
  rates = {}

  def steps() -> str:
    text, found = train_steps(smoke, size, per_device_batch, report)
    rates.update(found)
    return text

  report.section('Machine', lambda: machine(smoke))
  report.section('Tests that need a device', lambda: tests(smoke))
  report.section('Parity with PyTorch (matmul precision highest)', lambda: parity(smoke))
  report.section(f'Train step at {size}x{size}', steps)
  report.section('Scaling over the devices present', lambda: scaling(smoke, min(size, 128)))
  report.section('Input pipeline against the step', lambda: input_rate(smoke, size, rates))
  report.write()
  print(report.text())
  return 0


if __name__ == '__main__':
  from absl import app, flags

  _SMOKE = flags.DEFINE_bool('smoke', False, 'CPU, tiny sizes: check the script in minutes')
  _REPORT = flags.DEFINE_string('report', 'device_check.md', 'markdown report written here')
  _BUDGET = flags.DEFINE_float('budget', 450.0, 'seconds after which sections are skipped')
  _SIZE = flags.DEFINE_integer('size', None, 'image size (default 512; --smoke: 32)')
  _BATCH = flags.DEFINE_integer('per_device_batch', 4, 'train-step batch per device')

  app.run(lambda argv: sys.exit(main(_SMOKE.value, _REPORT.value, _BUDGET.value, _SIZE.value,
                                     _BATCH.value)))
