"""Smoke tests of the benchmark scripts: each runs end to end and prints / writes what it promises.

No timing claims: figures are only checked to be positive and finite. A tiny network (widths
4..16, 32x32, conv_impl 'xla', which compiles fastest; 16x16 and a few layers for the per-op
benchmark) and one timed round keep the runs within about a minute; compilation is most of it.
The tests call the scripts' functions (the flags are defined only when a script runs), and run
each script's `--helpfull` as `python -m benchmarks.<script>`.
"""

import csv
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import common, inference, ops, scaling, train_step
from configs import kits
from ecm_jax.models import ops as jax_ops

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(features=(4, 8, 8, 16, 16), size=32, conv_impl='xla')  # with one timed round


def _tiny_config(variant: str, batch: int | None = None):
  """configs/kits.py with the VARIANTS row `variant`, on the tiny network."""
  return common.benchmark_config(kits.get_config(), variant=variant, batch=batch, **TINY)


def _positive(value) -> bool:
  return math.isfinite(value) and value > 0


def _read_csv(path) -> list[dict]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_train_step_jax_vs_torch(tmp_path, capsys):
  path = tmp_path / 'train_step.csv'
  # host memory 'default': this process's allocator is left as it is (as the script reports it).
  rows = train_step.run([_tiny_config('unet', batch=2)], repeats=1, gemm_size=256,
                        host_memory='default', torch_host_memory='retain', csv=str(path))
  out = capsys.readouterr().out
  assert '| variant | framework | step s |' in out
  assert 'host memory: JAX default, PyTorch retain' in out  # PyTorch in its own process
  assert '| unet | JAX |' in out and '| unet | PyTorch |' in out
  jax_row, torch_row = rows
  for key in ('step_s', 'images_per_s', 'memory_mb', 'gflop_per_step', 'fraction_of_peak',
              'gemm_peak_gflops'):
    assert _positive(jax_row[key]) and _positive(torch_row[key]), key
  assert _positive(jax_row['compile_s']) and _positive(jax_row['jax_over_torch'])
  # Same initial weights and batch on both sides: the same first loss up to float32 rounding.
  assert jax_row['first_loss'] == pytest.approx(torch_row['first_loss'], rel=1e-5)
  written = _read_csv(path)
  assert [(r['framework'], r['host_memory']) for r in written] == [('JAX', 'default'),
                                                                   ('PyTorch', 'retain')]
  # The PyTorch process reports its own allocator and version.
  assert [r['version'].split()[0] for r in written] == ['jax', 'PyTorch']
  assert set(written[0]) == set(jax_row)


def test_inference_fold(tmp_path, capsys):
  path = tmp_path / 'inference.csv'
  rows, difference, scale = inference.run(_tiny_config('unet+ec'), batch=2, slices=5, repeats=1,
                                          csv=str(path))
  out = capsys.readouterr().out
  assert '| unfolded |' in out and '| folded |' in out and 'max |folded - unfolded|' in out
  assert [r['form'] for r in rows] == ['unfolded', 'folded']
  for row in rows:
    for key in ('gflop_per_slice', 'slices_per_s', 'volume_latency_s', 'volume_speedup'):
      assert _positive(row[key]), key
  assert rows[1]['gflop_per_slice'] < rows[0]['gflop_per_slice']  # one conv per EC block, not 3
  assert _positive(scale) and difference <= 1e-5 * scale
  assert len(_read_csv(path)) == 2


def test_scaling_plan():
  assert scaling.plan([1, 2, 4], per_device_batch=2, global_batch=6) == {
      1: {'weak': 2, 'strong': 6}, 2: {'weak': 4, 'strong': 6}, 4: {'weak': 8}}


def test_scaling_worker_env_replaces_device_count(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2 --xla_foo=1')
  assert scaling.worker_env(4)['XLA_FLAGS'] == (
      '--xla_foo=1 --xla_force_host_platform_device_count=4')


def test_scaling_weak_and_strong(tmp_path, capsys):
  out_prefix = tmp_path / 'scaling'
  # The workers' host memory 'default', as before; they run `python -m benchmarks.scaling`.
  scaling.run_parent(_tiny_config('unet'), devices=[2], per_device_batch=1, global_batch=2,
                     repeats=1, out=out_prefix, host_memory_mode='default')
  out = capsys.readouterr().out
  assert 'simulated CPU devices' in out and 'not a speed-up claim' in out
  rows = _read_csv(f'{out_prefix}.csv')
  assert [(r['mode'], r['devices'], r['global_batch']) for r in rows] == [
      ('weak', '1', '1'), ('weak', '2', '2'), ('strong', '1', '2'), ('strong', '2', '2')]
  assert set(rows[0]) >= {'step_s', 'images_per_s', 'efficiency', 'loss_after_step',
                          'loss_after_step_1_device', 'loss_rel_diff', 'loss_ok'}
  for row in rows:
    assert _positive(float(row['images_per_s'])) and _positive(float(row['efficiency']))
    assert row['loss_ok'] == 'True'
  assert float(rows[0]['efficiency']) == 1.0
  png = tmp_path / 'scaling.png'
  assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_ops_per_layer_with_torch(capsys):
  pytest.importorskip('torch')
  rows = ops.run(size=16, features=(4, 8, 8, 16, 16), repeats=1, impls=['xla', 'gemm'],
                 with_torch=True, host_memory='default', only=r'enc1\.|aspp d6')
  out = capsys.readouterr().out
  assert '| xla/torch f+b time | gemm/torch f+b time |' in out
  # enc1's convs and EC branches, and ASPP's rate 6; a shape is listed once, with its count
  # (dec1.1's conv has enc1.1's shape).
  assert [(r['layer'], r['kernel'], r['count']) for r in rows] == [
      ('enc1.0', '3x3x4x8', 1), ('enc1.0 1x3', '1x3x4x8', 1), ('enc1.0 3x1', '3x1x4x8', 1),
      ('enc1.1', '3x3x8x8', 2), ('enc1.1 1x3', '1x3x8x8', 1), ('enc1.1 3x1', '3x1x8x8', 1),
      ('aspp d6', '3x3x16x256 d6', 1)]
  for row in rows:
    for impl in ('xla', 'gemm', 'torch'):
      assert all(_positive(t) for t in row[impl]), (row['layer'], impl)
  assert '- unet: xla ' in out and 'gemm/torch time' in out


def test_ops_torch_conv_matches_jax():
  # The PyTorch side computes the same convolution and gradients (NCHW/OIHW from NHWC/HWIO, 'SAME'
  # padding, dilation), so that its times compare like with like.
  pytest.importorskip('torch')
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (1, 3, 3, 5))
  forward, both, r, out = ops.torch_conv_thunks(x, kernel, 2)
  y, vjp = jax.vjp(lambda x, k: jax_ops.conv2d(x, k, dilation=2, impl='xla'), x, kernel)
  np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)
  dx, dk = both()
  want_dx, want_dk = vjp(r)
  np.testing.assert_allclose(dx.permute(0, 2, 3, 1).numpy(), want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dk.permute(2, 3, 1, 0).numpy(), want_dk, rtol=1e-4, atol=1e-4)
  assert forward() is None


def test_benchmark_config_applies_the_variant_row():
  config = _tiny_config('unet', batch=2)
  assert config.variant == 'unet' and not config.model.ec and not config.model.mus
  assert (config.data.image_size, config.train.batch_size) == (32, 2)
  assert tuple(config.model.features) == (4, 8, 8, 16, 16) and config.model.conv_impl == 'xla'
  back = common.benchmark_config(config, variant='ec_cam_unet')  # the switches reset first
  assert back.model.ec and back.model.mus and back.variant == 'ec_cam_unet'
  assert config.variant == 'unet'  # a copy: the argument is left as it was


@pytest.mark.parametrize('script', ['train_step', 'inference', 'scaling', 'ops', 'input_pipeline'])
def test_help_lists_the_host_memory_modes(script):
  done = subprocess.run([sys.executable, '-m', f'benchmarks.{script}', '--helpfull'],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr  # absl: 1 after help
  assert '--host_memory: <auto|huge_pages+retain|huge_pages|retain|default>' in done.stdout
