"""The segmentation losses of `ecm_jax.train.losses` (eqs. 11-13, 17) on torch tensors.

Logits are (B, K, H, W) (NCHW, as the torch models return them); labels (B, H, W) integer class
indices. K = 1 uses a sigmoid, K > 1 a softmax over the classes (background included).
"""

import ml_collections
import torch
import torch.nn.functional as F

from ecm_jax.train.losses import MAIN_LOSSES


def _probs_and_targets(logits: torch.Tensor, labels: torch.Tensor):
  """Foreground probabilities and one-hot targets, both (B, K_fg, H, W)."""
  if logits.shape[1] == 1:
    return torch.sigmoid(logits), (labels[:, None] == 1).to(logits.dtype)
  num_classes = logits.shape[1]
  probs = torch.softmax(logits, dim=1)[:, 1:]
  targets = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].to(logits.dtype)
  return probs, targets


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
  """Eq. (11) over the whole batch, the mean over foreground classes. `losses.soft_dice_loss`."""
  probs, targets = _probs_and_targets(logits, labels)
  axes = (0, 2, 3)
  intersection = (probs * targets).sum(dim=axes)
  denominator = probs.sum(dim=axes) + targets.sum(dim=axes)
  return (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Eq. (12): mean binary (K = 1) or softmax (K > 1) cross-entropy. `losses.cross_entropy_loss`."""
  if logits.shape[1] == 1:
    return F.binary_cross_entropy_with_logits(logits[:, 0], (labels == 1).to(logits.dtype))
  return F.cross_entropy(logits, labels.long())


def _main_loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, smooth: float):
  if kind == 'dice':
    return soft_dice_loss(logits, labels, smooth)
  if kind == 'bce':
    return cross_entropy_loss(logits, labels)
  if kind == 'dice+bce':
    return soft_dice_loss(logits, labels, smooth) + cross_entropy_loss(logits, labels)
  raise ValueError(f'config.loss.main must be one of {MAIN_LOSSES}, got {kind!r}')


def segmentation_loss(outputs: dict, labels: torch.Tensor, config: ml_collections.ConfigDict):
  """(loss, {'loss_main'[, 'loss_side']}) as `losses.segmentation_loss`: with a side output
  Dice(main) + BCE(side) (or the `config.alpha` weighting), else `config.main` on the main head."""
  if 'side_logits' not in outputs:
    loss = _main_loss(config.main, outputs['logits'], labels, config.dice_smooth)
    return loss, {'loss_main': loss}
  main = soft_dice_loss(outputs['logits'], labels, config.dice_smooth)
  side = cross_entropy_loss(outputs['side_logits'], labels)
  if config.alpha is None:
    loss = main + side
  else:
    loss = config.alpha * main + (1.0 - config.alpha) * side
  return loss, {'loss_main': main, 'loss_side': side}
