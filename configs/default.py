"""Defaults shared by every config: the paper's network (Section III) and recipe (Section IV-C).

Dataset configs (`kits.py`, `msd_pancreas.py`, ...) start from `get_config()` here and change only
what differs. Every knob lives here, with a comment. A config file may take a variant name after a
colon, e.g. `--config configs/kits.py:unet`, selecting a row of the paper's tables (`VARIANTS`).
"""

import ml_collections
from ml_collections import config_dict

# Rows of Tables I, II, III and V as overrides of `config.model` (the full model is the default).
_ABLATION_OFF = dict(ec=False, cc=False, sc=False, mus=False, dws=False)
VARIANTS = {
    # Table II (ablation) / Table V (attention comparison)
    'ec_cam_unet': {},
    'unet': dict(_ABLATION_OFF),
    'unet+cc': dict(_ABLATION_OFF, cc=True),
    'unet+sc': dict(_ABLATION_OFF, sc=True),
    'unet+coa': dict(_ABLATION_OFF, cc=True, sc=True),
    'unet+mus': dict(_ABLATION_OFF, mus=True),
    'unet+ec': dict(_ABLATION_OFF, ec=True),
    'unet+dws': dict(_ABLATION_OFF, dws=True),
    'unet+coag_musfu': dict(_ABLATION_OFF, cc=True, sc=True, mus=True),
    'unet+coag_musfu+ec': dict(_ABLATION_OFF, cc=True, sc=True, mus=True, ec=True),
    # Table III (fusion of CoA and MuS), on the full model
    'fusion_series': dict(fusion='series'),
    'fusion_add': dict(fusion='add'),
    'fusion_fuse': dict(fusion='fuse'),
    # Table I / V baselines (separate architectures, trained without the DWS side output)
    'unet_se': dict(name='unet_se', dws=False),
    'unet_cbam': dict(name='unet_cbam', dws=False),
    'attention_unet': dict(name='attention_unet', dws=False),
    'unet_pp': dict(name='unet_pp', dws=False),
    'danet': dict(name='danet', dws=False),
    # Table I networks of their own design (sizes: model.cenet_features, msunet_features,
    # hrnet_size, segformer_size)
    'cenet': dict(name='cenet', dws=False),
    'msunet': dict(name='msunet', dws=False),
    'hrnet': dict(name='hrnet', dws=False),
    'segformer': dict(name='segformer', dws=False),
}


def get_model_config() -> ml_collections.ConfigDict:
  """`config.model`: the architecture. `build_model(config.model)` reads only this."""
  m = ml_collections.ConfigDict()
  # Architecture: ec_cam_unet | unet | unet_se | unet_cbam | attention_unet | unet_pp | danet |
  # cenet | msunet | hrnet | segformer.
  # Only ec_cam_unet reads ec/cc/sc/mus/fusion; every name reads dws. `unet` = ec_cam_unet with
  # ec, cc, sc, mus off (the same graph). See ecm_jax/models/networks.py.
  m.name = 'ec_cam_unet'
  m.features = (64, 128, 256, 512, 1024)  # encoder widths, depth 5 (Section III, Fig. 1)
  m.in_channels = 1  # input image channels
  m.num_classes = 1  # 1: binary (sigmoid); >1: softmax over classes (incl. background)
  # EC-CaM-UNet switches (Table II): every ablation row is a combination of these.
  m.ec = True  # Enhanced Convolution in the encoder (3x3 + 1x3 + 3x1 branches, own BN each)
  m.cc = True  # channel-correlation attention, eqs. (5)-(7)
  m.sc = True  # spatial-correlation attention, eqs. (8)-(9)
  m.mus = True  # multi-scale ASPP block
  m.dws = True  # deeply supervised side output from the bottleneck (Fig. 2d)
  m.fusion = 'fuse'  # CoA/MuS fusion (Table III): fuse (eq. 10) | add | series
  m.ec_folded = False  # EC deploy form (one 3x3 conv + bias per block); set by ecm_jax.models.fold.fold_ec
  m.cc_hidden = 8  # channels of CC's 1D encoder-decoder (not given in the paper)
  m.sc_scale = 'none'  # SC logit scale: 'none' (paper: softmax(E E^T)) | 'rsqrt_c' (1/sqrt(C))
  m.mus_channels = 256  # width of each ASPP branch
  m.mus_rates = (6, 12, 18)  # ASPP dilation rates
  m.side_features = (256, 64, 16)  # widths of the three side-output deconvs (2x, 2x, 4x)
  m.se_reduction = 16  # SE / CBAM channel reduction (Table V baselines)
  # Table I networks of their own design (the paper gives no size for HR-Net or SegFormer:
  # W18 and B0 are our choice; W48 / B2 are one flag away).
  m.cenet_features = (64, 128, 256, 512)  # CE-Net's ResNet-34 stage widths (Gu et al. 2019)
  m.msunet_features = (32, 64, 128, 256, 512)  # MSU-Net level widths (Su et al. 2021)
  m.hrnet_size = 'w18'  # HRNetV2: w18_small_v2 | w18 | w32 | w48
  m.segformer_size = 'b0'  # SegFormer (MiT encoder): b0 | b1 | b2 | b3 | b4 | b5
  m.segformer_drop_path = 0.1  # stochastic depth, rising linearly to this over the blocks
  m.segformer_dropout = 0.1  # dropout before the decoder's classifier
  m.bn_momentum = 0.9  # flax convention (running = m*running + (1-m)*batch); = PyTorch 0.1
  m.bn_epsilon = 1e-5
  # Compute dtype: float32 | bfloat16 | float64. bfloat16: activations, the residuals kept for the
  # backward pass and BatchNorm's input are bfloat16; parameters, optimizer state, BatchNorm
  # statistics, SC's softmax, global means, the logits and the loss stay float32 (a bf16 step's
  # buffers are ~0.5x float32's; docs/accelerators.md). float64: everything float64 (needs
  # jax_enable_x64: for numerics checks, e.g. ecm_jax/torch_ref/parity.py --float64).
  m.dtype = 'float32'
  # float32 matmul/convolution precision (jax.default_matmul_precision for the whole network):
  # default (JAX's: TF32 on NVIDIA GPUs, bf16 passes on TPUs, exact on the CPU: for speed) |
  # high | highest (true float32: parity with PyTorch; the parity report sets it). No effect on
  # the CPU or on bfloat16 operands. Tolerances per platform: docs/numerics.md.
  m.matmul_precision = 'default'
  # Rematerialisation (recompute in the backward pass instead of keeping): none | blocks (each conv
  # block, the bottleneck, the side output) | levels (each encoder level / decoder stage). Same
  # loss and gradients; less memory, ~+30 % step compute. U-Net family only. docs/accelerators.md.
  m.remat = 'none'
  m.conv_impl = 'auto'  # convolution kernels: auto (by backend) | xla (lax.conv) | gemm (CPU-fast)
  return m


def with_variant(model_config: ml_collections.ConfigDict,
                 variant: str) -> ml_collections.ConfigDict:
  """A copy of `model_config` as the row `variant` of `VARIANTS`: the table switches (every key of
  a row) reset to their defaults, then the row applied; widths, sizes and dtype stay, whatever row
  `model_config` was. For the summary table and the benchmarks, which build several rows."""
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; choose one of: {", ".join(VARIANTS)}')
  defaults = get_model_config()
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.update({key: defaults[key] for row in VARIANTS.values() for key in row})
  config.update(VARIANTS[variant])
  return config


def get_config(variant: str = 'ec_cam_unet') -> ml_collections.ConfigDict:
  """The paper's recipe on KiTS19-sized CT slices; dataset configs override `data` and `train`."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # model init, data order and augmentation all derive from this

  config.model = get_model_config()
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}; choose one of: {", ".join(VARIANTS)}')
  config.model.update(VARIANTS[variant])
  config.variant = variant  # recorded for reports

  config.data = d = ml_collections.ConfigDict()
  d.dataset = 'kits19'  # reader: kits19 | msd | nih_pancreas | synthetic (built-in demo)
  d.root = config_dict.placeholder(str)  # dataset folder on disk (required for real datasets)
  d.cache_dir = ''  # preprocessing cache; '' = ~/.cache/ecm_jax
  d.modality = 'ct'  # ct: window + scale to [0, 1]; mri: per-volume robust z-score
  d.window = (-79.0, 304.0)  # CT window in HU (kidney; pancreas uses (-100, 240))
  d.mri_percentiles = (0.5, 99.5)  # MRI: clip to these percentiles before z-scoring
  d.foreground_labels = (1, 2)  # label values merged into the target (KiTS: kidney + tumour)
  d.merge_foreground = True  # True: every foreground label -> class 1 (paper); False: i-th -> i+1
  d.other_labels = 'error'  # label values not 0/foreground: error | background (e.g. CHAOS organs)
  d.missing_labels = 'error'  # image without label file: error | skip (KiTS19 test cases 210-299)
  d.affine_tolerance = 1e-3  # max |image affine - label affine| (mm) accepted as the same geometry
  d.image_size = 512  # slices are resized to image_size x image_size (must be divisible by 16)
  d.split = (170, 10, 30)  # train / val / test case counts (KiTS19 in the paper)
  d.split_seed = 0  # case-level split seed (independent of config.seed)
  d.slices = 'all'  # all (paper) | foreground (foreground slices + background_fraction of the rest)
  d.background_fraction = 0.1  # with slices='foreground': share of background slices kept
  d.flip_prob = 0.5  # augmentation: horizontal flip
  d.rotate_degrees = 10.0  # augmentation: rotation uniform in [-r, r] degrees
  d.blur_prob = 0.5  # augmentation: Gaussian blur of the image
  d.blur_sigma = (0.5, 1.5)  # blur sigma range in pixels (not given in the paper)
  # grain worker processes: -1 auto (sized to the host's CPUs per local device,
  # ecm_jax.config.resolve_num_workers: 2 on a 2-core CPU), 0 in-process
  d.num_workers = -1
  d.read_threads = 1  # threads per process preparing batches (2 were not faster on 2 cores)
  d.prefetch = 4  # batches buffered ahead of the model
  # dataset='synthetic' only: the built-in SYNTHETIC demo set (KiTS19 layout, written to cache_dir)
  d.synthetic_cases = 8  # number of cases
  d.synthetic_slices = 32  # slices per case
  d.synthetic_size = 96  # in-plane size in pixels
  d.synthetic_seed = 0  # generator seed (the data are a pure function of these four fields)

  config.loss = l = ml_collections.ConfigDict()
  l.alpha = config_dict.placeholder(float)  # None: L_Dice + L_BCE (paper); float: eq. (17) weights
  l.main = 'dice'  # loss on the main head when DWS is off: dice | bce | dice+bce
  l.dice_smooth = 1.0  # soft Dice smoothing term

  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 4  # global batch, split over all devices
  t.num_epochs = 150
  t.max_steps = config_dict.placeholder(int)  # stop early (short runs); the schedule still spans it
  t.learning_rate = 1e-5  # Adam
  t.weight_decay = 1e-4  # L2 added to the gradient before Adam (PyTorch Adam(weight_decay=...))
  t.eval_every_epochs = 1  # validation Dice every N epochs
  t.eval_batch_size = 8  # global batch for validation
  t.checkpoint_keep = 2  # latest checkpoints kept (the best by val Dice is kept as well)
  t.checkpoint_every_steps = 500  # also checkpoint between validations (crash recovery)
  t.log_every_steps = 10  # metrics.jsonl / progress bar refresh
  return config
