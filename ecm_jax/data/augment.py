"""The paper's training augmentation (Section IV-C): draw a random transform, then apply it to a slice.

Horizontal flip and rotation move image and mask together (bilinear for the image, nearest for the
mask, edges replicated for both, so they stay aligned); Gaussian blur touches the image only.
"""

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class Transform:
  flip: bool  # mirror columns (left-right)
  angle: float  # rotation in degrees about the slice centre
  blur_sigma: float  # Gaussian blur sigma in pixels; 0 = no blur


def draw(rng: np.random.Generator, *, flip_prob: float, rotate_degrees: float, blur_prob: float,
         blur_sigma: tuple[float, float]) -> Transform:
  """One random transform; always consumes the same four draws, whatever is enabled."""
  flip = rng.random() < flip_prob
  angle = rng.uniform(-rotate_degrees, rotate_degrees)
  blur = rng.random() < blur_prob
  sigma = rng.uniform(*blur_sigma)
  return Transform(flip=bool(flip), angle=float(angle), blur_sigma=float(sigma) if blur else 0.0)


def apply(image: np.ndarray, label: np.ndarray, transform: Transform):
  """Transform an image (S, S, C) float32 and its mask (S, S) uint8 together."""
  if transform.flip:
    image, label = image[:, ::-1], label[:, ::-1]
  if transform.angle:
    image = ndimage.rotate(image, transform.angle, axes=(1, 0), reshape=False, order=1,
                           mode='nearest')
    label = ndimage.rotate(label, transform.angle, axes=(1, 0), reshape=False, order=0,
                           mode='nearest')
  if transform.blur_sigma:
    sigma = transform.blur_sigma
    image = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode='nearest')
  return np.ascontiguousarray(image, np.float32), np.ascontiguousarray(label)
