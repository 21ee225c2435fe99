"""The networks: EC-CaM-UNet with its ablation switches and the baselines of Tables I and V.

`build_model(config.model)` is the one entry point; every row of `configs.default.VARIANTS` is a
config. The model maps x (B, H, W, in_channels) float32 to a dict: 'logits' (B, H, W, num_classes)
float32 and, when DWS is on, 'side_logits' of the same shape. Call with `train=True` and
`mutable=['batch_stats']` to train, `train=False` to predict; `mutable=['intermediates']` also
returns the attention maps (`attention_maps` picks them out). Parameters are float32 for compute
dtypes float32 and bfloat16; model.dtype 'float64' (needs jax_enable_x64) makes parameters,
statistics and outputs float64 too.

Which `config.model` switches each name reads:
  ec_cam_unet     ec, cc, sc, mus, fusion, dws (every ablation row of Tables II, III, V);
  unet            dws only: ec_cam_unet with ec, cc, sc and mus off (the same graph);
  unet_se, unet_cbam, danet, attention_unet, unet_pp
                  dws only: the published architecture with a plain encoder; DWS, when on, reads
                  the bottleneck as in EC-CaM-UNet (U-Net++: node X^{4,0}).
  cenet           cenet_features (ecm_jax/models/cenet.py);
  msunet          msunet_features (ecm_jax/models/msunet.py);
  hrnet           hrnet_size (ecm_jax/models/hrnet.py);
  segformer       segformer_size, segformer_drop_path, segformer_dropout
                  (ecm_jax/models/segformer.py);
                  these four have no DWS side output (model.dws must be False) and do not read
                  model.features.

Every model has `input_multiple()` (H and W must be multiples of it) and `smallest_input()` (the
smallest H = W it takes).

Summary table (parameters, forward GFLOPs per image from XLA cost analysis, output shapes):
  python -m ecm_jax.models.summary --config configs/kits.py [--variants unet,ec_cam_unet]
"""

from collections.abc import Mapping, Sequence
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ecm_jax.models import cenet, hrnet, msunet, ops, segformer
from ecm_jax.models.attention import CBAM, AttentionGate, DualAttention, SqueezeExcitation
from ecm_jax.models.bottleneck import FUSIONS, CoAGMuSFu
from ecm_jax.models.layers import (
  Conv2D,
  DoubleConv,
  LayerSettings,
  PatchUpsample,
  at_least_float32,
  check_input,
  matmul_precision_scope,
  remat,
)
from ecm_jax.models.side_output import SideOutput

UNET_NAMES = ('ec_cam_unet', 'unet', 'unet_se', 'unet_cbam', 'attention_unet', 'unet_pp', 'danet')
# Table I networks of their own design (no U-Net encoder, no DWS side output).
OTHER_NAMES = ('cenet', 'msunet', 'hrnet', 'segformer')
MODEL_NAMES = UNET_NAMES + OTHER_NAMES
# Compute dtypes. 'float64' (params, statistics and outputs float64 too) needs jax_enable_x64: it
# separates implementation differences from float32 rounding (ecm_jax/parity.py --float64).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}
SC_SCALES = ('none', 'rsqrt_c')
DEPTH = 5  # encoder levels (four 2x2 max-pools); DWS upsamples by 2 * 2 * 4 = 16
ATTENTION_MAP_NAMES = ('sc_attention', 'cc_weights', 'coa_output')
# XLA:CPU spends most of an init's compile time optimising one threefry random-number kernel per
# parameter (minutes for these models); init runs once, so `init_variables` compiles it at backend
# optimisation level 1: about 4x faster to compile, and bit-identical values (checked against the
# default). Level 0 is faster still but not safe: its init values differ in the last bit and its
# max-pool gradients come out NaN.
FAST_COMPILE_OPTIONS = {'xla_backend_optimization_level': 1}


class Encoder(nn.Module):
  """U-Net encoder: `level{i}` = two conv blocks (EC blocks when `ec`), 2x2 max-pool between levels.

  Returns every level's output (the skips; the last is the bottleneck feature F). Under remat
  'levels' each level (its max-pool and two blocks) is rematerialised.
  """
  features: Sequence[int]
  ec: bool = False
  ec_folded: bool = False
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    levels = []
    level = remat(DoubleConv, self.settings, ('levels',), (2,))
    for i, width in enumerate(self.features):
      x = level(width, self.ec, self.ec_folded, self.settings, pool=i > 0, name=f'level{i}')(
          x, train)
      levels.append(x)
    return levels


class DecoderStage(nn.Module):
  """One decoder level: ConvTranspose2x2 stride 2 (with bias) to `features` (`upsample`), the skip
  (through an additive attention gate `gate` when `attention_gate`) concatenated before the
  upsampled map, two plain conv blocks (`convs`)."""
  features: int
  attention_gate: bool = False
  settings: LayerSettings = LayerSettings()

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, train: bool) -> jax.Array:
    up = PatchUpsample(self.features, 2, settings=self.settings, name='upsample')(x)
    if self.attention_gate:
      skip = AttentionGate(max(self.features // 2, 1), self.settings, name='gate')(skip, up, train)
    merged = jnp.concatenate([skip, up], axis=-1)
    return DoubleConv(self.features, settings=self.settings, name='convs')(merged, train)


class UNet(nn.Module):
  """U-Net (Ronneberger et al. 2015) with a block at the bottleneck: EC-CaM-UNet (Fig. 1) and the
  U-Net baselines.

  `encoder` (EC blocks when `ec`) -> `bottleneck` on the last level (CoA-MuSFu, SE, CBAM, DA-Net
  head; None: identity) -> `decoder{i}` (attention gates on the skips when `attention_gates`) ->
  Conv1x1 with bias (`head`). `side_output` (DWS, Fig. 2d) reads the bottleneck output.
  """
  features: Sequence[int] = (64, 128, 256, 512, 1024)
  in_channels: int = 1
  num_classes: int = 1
  ec: bool = False
  ec_folded: bool = False
  bottleneck: nn.Module | None = None
  attention_gates: bool = False
  side_output: nn.Module | None = None
  settings: LayerSettings = LayerSettings()

  def input_multiple(self) -> int:
    return 2**(len(self.features) - 1)

  def smallest_input(self) -> int:
    return self.input_multiple()

  @nn.compact
  @matmul_precision_scope
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    check_input(x, self, f'{len(self.features) - 1} 2x2 max-pools')
    s = self.settings
    levels = Encoder(tuple(self.features), self.ec, self.ec_folded, s, name='encoder')(
        x.astype(s.dtype), train)
    y = levels[-1]
    if self.bottleneck is not None:
      y = self.bottleneck(y, train)
    outputs = {}
    if self.side_output is not None:
      outputs['side_logits'] = self.side_output(y, train)
    stage = remat(DecoderStage, s, ('levels',), (3,))
    for i in reversed(range(len(self.features) - 1)):
      y = stage(self.features[i], self.attention_gates, s, name=f'decoder{i}')(y, levels[i], train)
    logits = Conv2D(self.num_classes, (1, 1), use_bias=True, settings=s, name='head')(y)
    outputs['logits'] = logits.astype(at_least_float32(logits.dtype))
    return outputs


class UNetPlusPlus(nn.Module):
  """U-Net++ (Zhou et al. 2018): nested dense skips, one final head (no deep supervision).

  Node X^{i,j} (`x{i}_{j}`, two plain conv blocks, width features[i]) takes
  concat(X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})); X^{i,0} is the encoder (2x2 max-pool between
  levels). Up (`up{i+1}_{j-1}`) is ConvTranspose2x2 stride 2 to features[i], as in our U-Net decoder.
  The head (`head`) reads X^{0,4}; `side_output` (DWS) reads the bottleneck node X^{4,0}.
  """
  features: Sequence[int] = (64, 128, 256, 512, 1024)
  in_channels: int = 1
  num_classes: int = 1
  side_output: nn.Module | None = None
  settings: LayerSettings = LayerSettings()

  def input_multiple(self) -> int:
    return 2**(len(self.features) - 1)

  def smallest_input(self) -> int:
    return self.input_multiple()

  @nn.compact
  @matmul_precision_scope
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    check_input(x, self, f'{len(self.features) - 1} 2x2 max-pools')
    s, depth = self.settings, len(self.features)
    node = remat(DoubleConv, s, ('levels',), (2,))
    nodes = {}
    y = x.astype(s.dtype)
    for i, width in enumerate(self.features):
      y = nodes[i, 0] = node(width, settings=s, pool=i > 0, name=f'x{i}_0')(y, train)
    for j in range(1, depth):
      for i in range(depth - j):
        up = PatchUpsample(self.features[i], 2, settings=s, name=f'up{i + 1}_{j - 1}')(
            nodes[i + 1, j - 1])
        merged = jnp.concatenate([nodes[i, k] for k in range(j)] + [up], axis=-1)
        nodes[i, j] = node(self.features[i], settings=s, name=f'x{i}_{j}')(merged, train)
    outputs = {}
    if self.side_output is not None:
      outputs['side_logits'] = self.side_output(nodes[depth - 1, 0], train)
    logits = Conv2D(self.num_classes, (1, 1), use_bias=True, settings=s, name='head')(
        nodes[0, depth - 1])
    outputs['logits'] = logits.astype(at_least_float32(logits.dtype))
    return outputs


def build_model(model_config: ml_collections.ConfigDict, *,
                bn_axis_name: str | None = None) -> nn.Module:
  """The network `config.model` describes (see the module docstring for what each name reads).

  bn_axis_name: mapped axis name for cross-replica BatchNorm under `shard_map` (not needed under
    `jit` with a sharded batch, where the statistics are global already).
  """
  m = model_config
  if m.name not in MODEL_NAMES:
    raise ValueError(f'model.name must be one of {MODEL_NAMES}, got {m.name!r}')
  if m.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {m.dtype!r}')
  if m.dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set jax.config.update("
                     "'jax_enable_x64', True) (or JAX_ENABLE_X64=1) before any JAX computation; "
                     "without it every float64 array would silently be float32")
  if m.name in OTHER_NAMES and m.dws:
    raise ValueError(f'model.name={m.name!r} has no deep-supervision side output: set '
                     f'model.dws=False (its VARIANTS row does)')
  if len(m.features) != DEPTH:
    raise ValueError(f'model.features needs {DEPTH} widths (encoder depth {DEPTH}), '
                     f'got {tuple(m.features)}')
  if m.fusion not in FUSIONS:
    raise ValueError(f'model.fusion must be one of {FUSIONS}, got {m.fusion!r}')
  if m.sc_scale not in SC_SCALES:
    raise ValueError(f'model.sc_scale must be one of {SC_SCALES}, got {m.sc_scale!r}')
  is_ec_cam_unet = m.name == 'ec_cam_unet'
  if m.ec_folded and not (is_ec_cam_unet and m.ec):
    raise ValueError('model.ec_folded=True (set by fold_ec) needs model.name=ec_cam_unet with '
                     'ec=True')

  remat_mode = m.get('remat', 'none')
  if remat_mode != 'none' and m.name in OTHER_NAMES:
    raise ValueError(f'model.remat={remat_mode!r} is implemented for the U-Net family '
                     f'({", ".join(UNET_NAMES)}); model.name={m.name!r} takes only remat=none')

  # 'auto' is resolved here, once, for the backend the model will run on (ecm_jax.models.ops).
  settings = LayerSettings(DTYPES[m.dtype], ops.resolve_impl(m.conv_impl), m.bn_momentum,
                           m.bn_epsilon, bn_axis_name, remat=remat_mode,
                           matmul_precision=m.get('matmul_precision', 'default'))
  # The bottleneck block and the side output are rematerialised as one unit each under any remat.
  whole = ('blocks', 'levels')
  io = dict(in_channels=m.in_channels, num_classes=m.num_classes, settings=settings)
  if m.name == 'cenet':
    return cenet.CENet(features=tuple(m.cenet_features), **io)
  if m.name == 'msunet':
    return msunet.MSUNet(features=tuple(m.msunet_features), **io)
  if m.name == 'hrnet':
    return hrnet.HRNetV2(size=m.hrnet_size, **io)
  if m.name == 'segformer':
    return segformer.SegFormer(size=m.segformer_size, drop_path=m.segformer_drop_path,
                               dropout=m.segformer_dropout, **io)
  side_output = (remat(SideOutput, settings, whole, (2,))(tuple(m.side_features), m.num_classes,
                                                        settings) if m.dws else None)
  common = dict(features=tuple(m.features), in_channels=m.in_channels, num_classes=m.num_classes,
                side_output=side_output, settings=settings)
  if m.name == 'unet_pp':
    return UNetPlusPlus(**common)
  bottleneck = None
  if is_ec_cam_unet and (m.cc or m.sc or m.mus):
    bottleneck = remat(CoAGMuSFu, settings, whole, (2,))(
        m.cc, m.sc, m.mus, m.fusion, m.cc_hidden, m.sc_scale, m.mus_channels, tuple(m.mus_rates),
        settings)
  elif m.name == 'unet_se':
    bottleneck = remat(SqueezeExcitation, settings, whole, (2,))(m.se_reduction, settings)
  elif m.name == 'unet_cbam':
    bottleneck = remat(CBAM, settings, whole, (2,))(m.se_reduction, settings=settings)
  elif m.name == 'danet':
    bottleneck = remat(DualAttention, settings, whole, (2,))(settings)
  return UNet(ec=is_ec_cam_unet and m.ec, ec_folded=m.ec_folded, bottleneck=bottleneck,
              attention_gates=m.name == 'attention_unet', **common)


def compiler_options(model_config: ml_collections.ConfigDict,
                     platform: str | None = None) -> dict[str, str]:
  """XLA compiler options a train step of `model_config` needs on `platform` (default: the default
  backend), for `jax.jit(...).lower(...).compile(compiler_options=...)`.

  XLA:CPU expands the optimisation barriers that `jax.checkpoint` (`model.remat`) puts around the
  recomputed inputs before common-subexpression elimination, which then merges the recomputation
  back into the forward pass: remat would change nothing on the CPU (measured: identical buffers).
  With remat on the CPU this skips that expansion ('cse_barrier_expander'); the step compiles, runs
  and gives the same values (tests/test_remat.py). GPU and TPU keep the barriers: nothing needed.
  """
  if model_config.get('remat', 'none') != 'none' and (platform or jax.default_backend()) == 'cpu':
    return {'xla_disable_hlo_passes': 'cse_barrier_expander'}
  return {}


def _smallest_input(model: nn.Module) -> tuple[int, int, int, int]:
  """(1, size, size, in_channels): the smallest input the model takes."""
  size = model.smallest_input()
  return (1, size, size, model.in_channels)


def init_variables(model: nn.Module, seed: int) -> dict:
  """{'params', 'batch_stats'} of a `build_model` model initialised from `seed`: the one way
  variables are made (training, evaluation, parity, benchmarks and tests all come here).

  No variable depends on the input's batch or spatial size, so this traces the smallest valid
  input (U-Net: (1, 16, 16, in_channels)). The 'rbg' generator and `FAST_COMPILE_OPTIONS`: XLA:CPU compiles
  threefry-based initialisers of a network this size several times slower (same values either way
  at optimisation level 1, checked).

  Portable across platforms: 'rbg' draws depend on the backend's random-bit generator, so the
  initialiser always runs on the host CPU (this process's CPU device, present beside every GPU/TPU
  backend) and the variables are then put on the default device: a seed gives the same variables
  on a CPU, GPU or TPU host (for one jax version). Only a process started with the CPU backend
  disabled (JAX_PLATFORMS=cuda) initialises on its default device, whose draws differ.
  """
  try:
    host = jax.local_devices(backend='cpu')[0]  # this process's (devices('cpu') are global)
  except RuntimeError:  # the CPU backend is disabled (JAX_PLATFORMS without 'cpu')
    host = None
  with jax.default_device(host):
    x = jnp.zeros(_smallest_input(model), jnp.float32)
    key = jax.random.key(seed, impl='rbg')
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init.lower(key, x).compile(compiler_options=FAST_COMPILE_OPTIONS)(key, x)
  variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
  if host is not None and jax.default_backend() != 'cpu':
    variables = jax.device_put(variables)  # onto the default (accelerator) device
  return variables


def variable_shapes(model: nn.Module) -> dict:
  """The abstract (shape and dtype) tree of `init_variables(model, seed)`; nothing is computed."""
  x = jax.ShapeDtypeStruct(_smallest_input(model), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False), x)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def attention_maps(intermediates: Mapping) -> dict[str, jax.Array]:
  """The sow'd maps of an apply with `mutable=['intermediates']`, by name: 'sc_attention' (S,
  (B,HW,HW)), 'cc_weights' (Theta, (B,C)), 'coa_output' (F_A, (B,H,W,C)); only those the model has."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(intermediates))
  return {path[-1]: values[0] for path, values in flat.items() if path[-1] in ATTENTION_MAP_NAMES}
