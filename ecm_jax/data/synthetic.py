"""SYNTHETIC demo data: small CT-like volumes in the KiTS19 layout, deterministic from a seed.

Each case is an abdomen-like phantom in Hounsfield units: air, a body outline with a fat rim, soft
tissue, a liver, a spine, bowel and a spleen of different HU, and two kidneys (label 1) of random
size and position, sometimes with a darker tumour (label 2). Gaussian noise and a slight blur make
the intensities overlap a little, so the network has to use shape as well as brightness. It is
written once under the cache dir (`synthetic_kits19-<hash>/`) and read by the ordinary kits19
reader.
Everything about it says SYNTHETIC: folder and case names, dataset.json, README.txt, NIfTI
descriptions and the log line.
"""

import hashlib
import json
import logging
import pathlib

import nibabel as nib
import numpy as np
from scipy import ndimage

from ecm_jax import files
from ecm_jax.data import cache

_log = logging.getLogger(__name__)

NAME = 'SYNTHETIC demo data'  # how every report, table and log line labels these data
GENERATOR_VERSION = 1  # bump when the phantom changes, so old folders are not reused
SLICE_THICKNESS_MM = 3.0
FIELD_OF_VIEW_MM = 400.0
NOISE_HU = 20.0


def ensure_dataset(config) -> pathlib.Path:
  """The synthetic dataset folder for `config.data`, written on first use."""
  params = dict(seed=config.synthetic_seed, num_cases=config.synthetic_cases,
                num_slices=config.synthetic_slices, size=config.synthetic_size)
  digest = hashlib.sha256(
      json.dumps({'version': GENERATOR_VERSION, **params}, sort_keys=True).encode()).hexdigest()
  root = cache.cache_root(config) / f'synthetic_kits19-{digest[:12]}'
  if not root.exists():
    try:
      with files.atomic_path(root) as temporary:
        write_dataset(temporary, **params)
    except OSError:
      if not root.exists():  # else another process wrote the same data first
        raise
  _log.warning('using %s (not real anatomy) at %s', NAME, root)
  return root


def write_dataset(root, *, seed: int, num_cases: int, num_slices: int, size: int):
  """Write `num_cases` synthetic cases in the KiTS19 layout into the new folder `root`."""
  root = pathlib.Path(root)
  root.mkdir(parents=True)
  pixel_mm = FIELD_OF_VIEW_MM / size
  # KiTS19's axis convention: axis 0 = slices (superior-inferior), then rows and columns.
  affine = np.array([[0, 0, -pixel_mm, 0], [0, -pixel_mm, 0, 0],
                     [-SLICE_THICKNESS_MM, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
  for index in range(num_cases):
    image, label = phantom(np.random.default_rng([seed, index]), num_slices, size)
    folder = root / f'synthetic_case_{index:05d}'
    folder.mkdir()
    for array, name in ((image, 'imaging.nii.gz'), (label, 'segmentation.nii.gz')):
      nifti = nib.Nifti1Image(array, affine)
      nifti.header['descrip'] = b'SYNTHETIC ecm-jax demo data'
      nifti.header.set_xyzt_units('mm')
      nib.save(nifti, folder / name)
  labels = {'0': 'background', '1': 'kidney (synthetic)', '2': 'tumour (synthetic)'}
  (root / 'dataset.json').write_text(json.dumps({
      'name': 'SYNTHETIC ecm-jax demo data (KiTS19 layout)', 'synthetic': True,
      'description': 'Synthetic CT-like phantoms, not real anatomy; for demos and tests only.',
      'generator': f'ecm_jax.data.synthetic v{GENERATOR_VERSION}', 'seed': seed,
      'modality': {'0': 'CT'}, 'labels': labels, 'numTraining': num_cases}, indent=1) + '\n')
  (root / 'README.txt').write_text(
      'SYNTHETIC DATA - not real anatomy.\n'
      f'Written by ecm_jax.data.synthetic (generator v{GENERATOR_VERSION}, seed {seed}) in the '
      'KiTS19 layout: synthetic_case_XXXXX/imaging.nii.gz (int16 HU) and segmentation.nii.gz '
      '(0 background, 1 kidney, 2 tumour). For demos and tests only.\n')


def phantom(rng: np.random.Generator, num_slices: int, size: int):
  """One synthetic case: (image int16 HU, label uint8), both (num_slices, size, size)."""
  z, y, x = np.meshgrid((np.arange(num_slices) + 0.5) / num_slices - 0.5,
                        (np.arange(size) + 0.5) / size - 0.5,
                        (np.arange(size) + 0.5) / size - 0.5, indexing='ij', sparse=True)
  hu = np.full((num_slices, size, size), -1000.0, np.float32)
  label = np.zeros(hu.shape, np.uint8)

  # Body outline (breathing a little along z) with a fat rim; rows grow towards the back.
  half_width = rng.uniform(0.38, 0.45) * (1 + 0.04 * np.cos(2 * np.pi * z))
  half_depth = rng.uniform(0.28, 0.34)
  body = (x / half_width) ** 2 + (y / half_depth) ** 2 <= 1
  hu[np.broadcast_to(body, hu.shape)] = -100.0
  inner = (x / (half_width - 0.03)) ** 2 + (y / (half_depth - 0.03)) ** 2 <= 1
  hu[np.broadcast_to(inner, hu.shape)] = 40.0

  def ellipsoid(centre, radii):
    (cz, cy, cx), (rz, ry, rx) = centre, radii
    return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1

  side = rng.choice([-1.0, 1.0])  # the liver's side; the spleen is on the other
  liver = (ellipsoid((rng.uniform(-0.3, -0.1), rng.uniform(-0.08, 0.0),
                      side * rng.uniform(0.12, 0.18)),
                     (0.45, rng.uniform(0.14, 0.18), rng.uniform(0.14, 0.2))),
           rng.uniform(55, 70))
  bowel = (ellipsoid((rng.uniform(-0.2, 0.2), rng.uniform(-0.18, -0.1), rng.uniform(-0.1, 0.1)),
                     (0.3, rng.uniform(0.05, 0.08), rng.uniform(0.1, 0.16))),
           rng.uniform(90, 115))
  spleen = (ellipsoid((rng.uniform(-0.25, -0.05), rng.uniform(0.02, 0.1),
                       -side * rng.uniform(0.2, 0.26)),
                      (0.25, rng.uniform(0.05, 0.07), rng.uniform(0.04, 0.06))),
            rng.uniform(100, 125))
  spine = (ellipsoid((0.0, half_depth - 0.1, 0.0), (2.0, 0.045, 0.045)), 500.0)
  for mask, value in (liver, bowel, spleen, spine):
    hu[np.broadcast_to(mask, hu.shape)] = value

  kidney_hu = rng.uniform(160, 200)
  kidneys = []
  for kidney_side in (-1.0, 1.0):
    centre = (rng.uniform(-0.15, 0.15), rng.uniform(0.08, 0.14),
              kidney_side * rng.uniform(0.12, 0.17))
    radii = (rng.uniform(0.2, 0.35), rng.uniform(0.05, 0.08), rng.uniform(0.045, 0.07))
    kidney = np.broadcast_to(ellipsoid(centre, radii), hu.shape)
    hu[kidney] = kidney_hu
    label[kidney] = 1
    kidneys.append((centre, radii))
  if rng.random() < 0.5:  # a tumour inside one kidney, darker than the kidney
    (cz, cy, cx), (rz, ry, rx) = kidneys[rng.integers(2)]
    radius = rng.uniform(0.4, 0.7) * min(ry, rx)
    tumour = np.broadcast_to(
        ellipsoid((cz, cy, cx), (radius * rz / min(ry, rx), radius, radius)), hu.shape)
    hu[tumour] = kidney_hu - rng.uniform(50, 80)
    label[tumour] = 2

  hu = ndimage.gaussian_filter(hu, sigma=(0, 0.6, 0.6)) + rng.normal(0, NOISE_HU, hu.shape)
  return np.round(hu).astype(np.int16), label


def noise_batches(config, count: int) -> list[dict]:
  """`count` SYNTHETIC train batches of pure noise, for numerics and speed checks (no anatomy):
  'image' (B,S,S,C) float32 standard normal (seed `config.seed`), 'label' (B,S,S) int32, channel 0
  thresholded into `model.num_classes` classes. B = `train.batch_size`, S = `data.image_size`."""
  rng = np.random.default_rng(config.seed)
  b, size, k = config.train.batch_size, config.data.image_size, config.model.num_classes
  batches = []
  for _ in range(count):
    image = rng.normal(size=(b, size, size, config.model.in_channels)).astype(np.float32)
    label = np.digitize(image[..., 0], np.linspace(0.5, 1.5, max(k - 1, 1))).astype(np.int32)
    batches.append({'image': image, 'label': label})
  return batches
