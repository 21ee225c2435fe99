"""Per-op benchmark of `ecm_jax.ops`: each kernel shape of a U-Net 64..1024, timed per `conv_impl`.

  python -m benchmarks.ops --size 128 --batch 4 --repeats 5 [--features 64,128,256,512,1024] \
      [--impls xla,gemm] [--noec] [--noaspp] [--only REGEX] [--torch] [--host_memory auto]

(from the repository root).

For every distinct conv shape of the network (plain U-Net; with --ec, the default, the 1x3/3x1
branches of the encoder; with --aspp, the default, the CoAG-MuSFu 1x1 and dilated 3x3 convs at the
bottleneck; --noec, --noaspp leave them out), and for `upsample_patches` and `max_pool_2x2`, it
times the forward and the forward+backward (value and gradients w.r.t. input and kernel of a random
linear functional), jitted, each impl interleaved with the others, median of --repeats after a
warm-up. Prints a markdown table with GFLOP/s (nominal: all taps of the kernel, as `lax.conv` counts
them; taps that only see padding are skipped by 'gemm', so its figure can exceed the peak), the
speed-up of each impl over the first, the conv time per training step summed over the layers (count
x fwd+bwd) per group, and the machine's GEMM peak measured in the same run. The upsampling and
pooling ops are compared with the library forms they replace (einsum; flax.linen.max_pool).

With --torch, PyTorch's `conv2d` (NCHW, as the reference model runs it) is timed on the same
values in the same rounds, and each JAX impl's time is divided by it (< 1: JAX faster). PyTorch
runs in this process, so both frameworks share its host allocator (--host_memory, as the other
benchmarks set it up): a per-layer comparison with equal allocators, where the train-step
benchmark runs PyTorch as out of the box by default. The forward outputs are checked to agree.
"""

from collections.abc import Sequence
import platform
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import measure_gemm_peak, median, time_interleaved
from ecm_jax import tables
from ecm_jax.models import ops

FEATURES = (64, 128, 256, 512, 1024)


def conv_layers(size, in_channels, features, ec, aspp, mus_channels=256, rates=(6, 12, 18)):
  """(group, name, H, Cin, Cout, kh, kw, dilation, count) for the convs of the network at `size`.

  group: 'unet' (the plain U-Net), 'ec' (EC 1x3/3x1 branches), 'aspp' (MuS + fusion 1x1 convs).
  Identical shapes within a group are listed once, with a count.
  """
  layers = []
  cin = in_channels
  for level, f in enumerate(features):  # encoder: two 3x3 convs per level
    h = size >> level
    for k, c in enumerate((cin, f)):
      layers.append(('unet', f'enc{level}.{k}', h, c, f, 3, 3, 1))
      if ec:
        layers.append(('ec', f'enc{level}.{k} 1x3', h, c, f, 1, 3, 1))
        layers.append(('ec', f'enc{level}.{k} 3x1', h, c, f, 3, 1, 1))
    cin = f
  for level in reversed(range(len(features) - 1)):  # decoder: after upsampling and concat
    h, f = size >> level, features[level]
    layers.append(('unet', f'dec{level}.0', h, 2 * f, f, 3, 3, 1))
    layers.append(('unet', f'dec{level}.1', h, f, f, 3, 3, 1))
  layers.append(('unet', 'head 1x1', size, features[0], 1, 1, 1, 1))
  if aspp:
    h, c = size >> (len(features) - 1), features[-1]
    layers.append(('aspp', 'aspp 1x1', h, c, mus_channels, 1, 1, 1))
    for r in rates:
      layers.append(('aspp', f'aspp d{r}', h, c, mus_channels, 3, 3, r))
    layers.append(('aspp', 'aspp proj 1x1', h, 5 * mus_channels + c, c, 1, 1, 1))
    layers.append(('aspp', 'fusion 1x1', h, 2 * c, c, 1, 1, 1))
  merged = {}
  for group, name, *shape in layers:
    key = (group, *shape)
    merged.setdefault(key, [name, 0])[1] += 1
  return [(key[0], name, *key[1:], count) for key, (name, count) in merged.items()]


def upsample_einsum(x, kernel):
  """Reference for `upsample_patches`: the same function as a single einsum (its earlier form)."""
  b, h, w, _ = x.shape
  s, s2, _, cout = kernel.shape
  return jnp.einsum('bhwc,ijco->bhiwjo', x, kernel).reshape(b, h * s, w * s2, cout)


def fwd_and_grad(fn, x, params):
  """Jitted forward, and forward + gradients w.r.t. x and params of <fn(x, params), r>."""
  r = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(fn, x, params).shape, x.dtype)
  fwd = jax.jit(fn)
  both = jax.jit(jax.value_and_grad(lambda x, p, r: jnp.vdot(fn(x, p), r), argnums=(0, 1)))
  return (lambda: fwd(x, params)), (lambda: both(x, params, r))


def torch_conv_thunks(x, kernel, dilation):
  """(forward thunk, forward+backward thunk, r, forward output) of PyTorch's `conv2d` on the values
  of `x` (NHWC) and `kernel` (HWIO), in PyTorch's layouts (NCHW, OIHW). The forward+backward thunk
  returns the gradients w.r.t. input and kernel of <conv2d(x, kernel), r> as PyTorch computes
  them (NCHW, OIHW tensors), as `fwd_and_grad` times them (its own random r); r and the output
  are numpy, NHWC."""
  import torch  # optional dependency: only with --torch
  dtype = getattr(torch, x.dtype.name)
  xt = torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy()).to(dtype)
  kt = torch.from_numpy(np.asarray(kernel, np.float32).transpose(3, 2, 0, 1).copy()).to(dtype)
  padding = (dilation * (kernel.shape[0] // 2), dilation * (kernel.shape[1] // 2))

  def conv(a, k):
    return torch.nn.functional.conv2d(a, k, padding=padding, dilation=dilation)

  with torch.no_grad():
    out = conv(xt, kt)
  r = torch.randn_like(out)
  xg, kg = xt.clone().requires_grad_(), kt.clone().requires_grad_()

  def forward():
    with torch.no_grad():
      conv(xt, kt)

  def both():
    return torch.autograd.grad(conv(xg, kg), (xg, kg), r)

  return forward, both, *(t.float().numpy().transpose(0, 2, 3, 1) for t in (r, out))


def time_row(variants, x, params, repeats, extra=None):
  """{variant: (fwd seconds, fwd+bwd seconds)}, all variants interleaved; `extra` maps more
  names to ready (fwd thunk, fwd+bwd thunk) pairs, timed in the same rounds."""
  thunks = {}
  for name, fn in variants.items():
    thunks[name, 'fwd'], thunks[name, 'both'] = fwd_and_grad(fn, x, params)
  for name, (fwd, both) in (extra or {}).items():
    thunks[name, 'fwd'], thunks[name, 'both'] = fwd, both
  t = time_interleaved(thunks, repeats)
  return {name: (median(t[name, 'fwd']), median(t[name, 'both'])) for name, _ in thunks}


def table_line(header: Sequence[str], align: str, cells: Sequence) -> str:
  """One row of `tables.markdown_table(header, rows, align)`, printed as soon as it is measured."""
  return tables.markdown_table(header, [cells], align).splitlines()[-1]


def run(*, size: int = 128, batch: int = 4, in_channels: int = 1,
        features: Sequence[int] = FEATURES, repeats: int = 5,
        impls: Sequence[str] = ('xla', 'gemm'), dtype: str = 'float32', ec: bool = True,
        aspp: bool = True, only: str = '', with_torch: bool = False, host_memory: str = 'default',
        command: str | None = None) -> list[dict]:
  """Runs the benchmark, prints its tables (after the command line `command`, if given); returns
  one dict per conv row: layer, group, H, cin, cout, kernel, count, and per impl (and 'torch')
  the (fwd, fwd+bwd) seconds. `impls`: conv impls, the first the baseline; `only`: a regex, the
  rows whose layer name matches; `host_memory`: this process's allocator in effect, for the
  report."""
  impls = list(impls)
  for impl in impls:
    ops.resolve_impl(impl)
  dtype = jnp.dtype(dtype)
  key = jax.random.PRNGKey(0)

  peak = measure_gemm_peak()
  print(f'# ops benchmark: {size}x{size}, batch {batch}, {dtype.name}, '
        f'median of {repeats}, impls interleaved; host memory {host_memory}')
  versions = f'jax {jax.__version__}'
  if with_torch:
    import torch
    versions += f', PyTorch {torch.__version__} ({torch.get_num_threads()} threads)'
  print(f'{versions}, backend {jax.default_backend()}, {platform.processor() or platform.machine()}, '
        f"'auto' -> {ops.resolve_impl('auto')}; GEMM peak (2048^3 matmul) {peak:.0f} GFLOP/s")
  if command is not None:
    print(command + '\n')
  timed = impls + ['torch'] * with_torch
  header = ['layer', 'x (B,H,W,C)', 'kernel', 'n']
  header += [f'{i} {column}' for i in timed for column in ('fwd ms', 'f+b ms', 'f+b GF/s')]
  header += [f'{i}/{impls[0]} f+b' for i in impls[1:]]
  header += [f'{i}/torch f+b time' for i in impls] if with_torch else []
  align = 'lll' + 'r' * (len(header) - 3)
  print(tables.markdown_table(header, [], align))
  totals = {}  # group -> impl -> seconds of count x fwd+bwd
  rows = []

  def wanted(label):
    return re.search(only, label) is not None

  for group, name, h, cin, cout, kh, kw, d, count in conv_layers(
      size, in_channels, features, ec, aspp):
    if not wanted(name):
      continue
    x = jax.random.normal(key, (batch, h, h, cin), dtype)
    k = (jax.random.normal(key, (kh, kw, cin, cout)) * (kh * kw * cin) ** -0.5).astype(dtype)
    variants = {i: (lambda i: lambda x, k: ops.conv2d(x, k, dilation=d, impl=i))(i) for i in impls}
    extra = {}
    if with_torch:
      forward, both, _, out = torch_conv_thunks(x, k, d)
      expected = np.asarray(variants[impls[0]](x, k), np.float32)
      tolerance = 1e-4 if dtype == jnp.float32 else 3e-2
      if not np.allclose(out, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max()):
        raise RuntimeError(f'{name}: PyTorch conv2d and {impls[0]} disagree '
                           f'(max |difference| {np.abs(out - expected).max():.3g})')
      extra['torch'] = (forward, both)
    res = time_row(variants, x, k, repeats, extra)
    flops = 2 * batch * h * h * kh * kw * cin * cout
    cells = []
    for i in timed:
      f, b = res[i]
      totals.setdefault(group, dict.fromkeys(timed, 0.0))[i] += count * b
      cells += [f'{f * 1e3:.1f}', f'{b * 1e3:.1f}', f'{3 * flops / b / 1e9:.0f}']
    cells += [f'{res[impls[0]][1] / res[i][1]:.2f}x' for i in impls[1:]]
    cells += [f'{res[i][1] / res["torch"][1]:.2f}' for i in impls] if with_torch else []
    kdesc = f'{kh}x{kw}x{cin}x{cout}' + (f' d{d}' if d > 1 else '')
    print(table_line(header, align, [name, (batch, h, h, cin), kdesc, count, *cells]),
          flush=True)
    rows.append(dict(layer=name, group=group, H=h, cin=cin, cout=cout, kernel=kdesc, count=count,
                     **res))

  print('\nSum of count x fwd+bwd over the conv layers (s):')
  for group, t in totals.items():
    ratios = [f'{i}/{impls[0]} {t[impls[0]] / t[i]:.2f}x' for i in impls[1:]]
    ratios += [f'{i}/torch time {t[i] / t["torch"]:.2f}' for i in impls] if with_torch else []
    print(f'- {group}: ' + ', '.join(f'{i} {t[i]:.2f}' for i in timed) + '; ' + ', '.join(ratios))

  # The other ops have one implementation each; compared with the library form they replace.
  other_header = ('op', 'x (B,H,W,C)', 'ours fwd ms', 'ours f+b ms', 'reference', 'ref f+b ms',
                  'ref/ours f+b')
  other_align = 'llrrlrr'
  print('\n' + tables.markdown_table(other_header, [], other_align))
  others = []
  for level in range(len(features) - 1):
    h, c = size >> (level + 1), features[level + 1]
    others.append((f'upsample_patches s2 (dec{level})', (h, c), (2, 2, c, c // 2),
                   ops.upsample_patches, 'einsum', upsample_einsum))
  for level in range(len(features) - 1):
    h, c = size >> level, features[level]
    others.append((f'max_pool_2x2 (enc{level})', (h, c), None, lambda x, _: ops.max_pool_2x2(x),
                   'flax max_pool', lambda x, _: nn.max_pool(x, (2, 2), strides=(2, 2))))
  for name, (h, c), kshape, ours, ref_name, ref in others:
    if not wanted(name):
      continue
    x = jax.random.normal(key, (batch, h, h, c), dtype)
    k = None if kshape is None else jax.random.normal(key, kshape, dtype) * c ** -0.5
    res = time_row({'ours': ours, 'ref': ref}, x, k, repeats)
    print(table_line(other_header, other_align, [
        name, (batch, h, h, c), f"{res['ours'][0] * 1e3:.1f}", f"{res['ours'][1] * 1e3:.1f}",
        ref_name, f"{res['ref'][1] * 1e3:.1f}", f"{res['ref'][1] / res['ours'][1]:.2f}x"]),
          flush=True)
  return rows


if __name__ == '__main__':
  from absl import app, flags

  from benchmarks.common import command_line, define_int_list
  from ecm_jax import cli, runtime
  from ecm_jax.errors import UserError

  _SIZE = flags.DEFINE_integer('size', 128, 'image size')
  _BATCH = flags.DEFINE_integer('batch', 4, 'batch')
  _IN_CHANNELS = flags.DEFINE_integer('in_channels', 1, 'input image channels')
  _FEATURES = define_int_list('features', ','.join(map(str, FEATURES)),
                              'encoder widths (default 64,128,256,512,1024)')
  _REPEATS = flags.DEFINE_integer('repeats', 5, 'timed rounds (median)')
  _IMPLS = flags.DEFINE_list('impls', ['xla', 'gemm'],
                             'comma-separated conv impls; the first is the baseline')
  _DTYPE = flags.DEFINE_string('dtype', 'float32', 'compute dtype (a jax.numpy dtype name)')
  _EC = flags.DEFINE_bool('ec', True, 'the EC 1x3/3x1 convs (--noec: leave them out)')
  _ASPP = flags.DEFINE_bool('aspp', True, 'the ASPP/fusion convs (--noaspp: leave them out)')
  _ONLY = flags.DEFINE_string('only', '', 'regex: time only the rows whose layer name matches')
  _TORCH = flags.DEFINE_bool('torch', False,
                             "also time PyTorch's conv2d on each conv layer, in this process")

  def main(argv):
    del argv
    unknown = [impl for impl in _IMPLS.value if impl not in ops.IMPLS]
    if unknown:
      raise app.UsageError(f'--impls: unknown {unknown}; choose from {", ".join(ops.IMPLS)}')
    allocator = runtime.host_memory_in_effect()
    run(size=_SIZE.value, batch=_BATCH.value, in_channels=_IN_CHANNELS.value,
        features=_FEATURES.value, repeats=_REPEATS.value, impls=_IMPLS.value, dtype=_DTYPE.value,
        ec=_EC.value, aspp=_ASPP.value, only=_ONLY.value, with_torch=_TORCH.value,
        host_memory=allocator, command=command_line('ops'))

  cli.run(main, UserError, compilation_cache=False)  # compile times are measured
