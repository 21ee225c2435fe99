"""Segmentation losses, eqs. (11)-(13) and (17).

Logits are (B,H,W,K) float32 (16-bit logits are computed on in float32, float64 ones in float64);
labels (B,H,W) integer class indices (binary tasks: {0, 1}, K = 1). K = 1 uses a sigmoid, K > 1 a
softmax over the classes (background included).
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ecm_jax.models.layers import at_least_float32

MAIN_LOSSES = ('dice', 'bce', 'dice+bce')


def _probs_and_targets(logits: jax.Array, labels: jax.Array):
  """Foreground probabilities and one-hot targets, both (B,H,W,K_fg), at least float32."""
  dtype = at_least_float32(logits.dtype)
  logits = logits.astype(dtype)
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(logits), (labels[..., None] == 1).astype(dtype)
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
  return probs, jax.nn.one_hot(labels, num_classes, dtype=dtype)[..., 1:]


def soft_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
  """Eq. (11): 1 - (2 sum(p y) + s) / (sum(p) + sum(y) + s), summed over the whole batch.

  With several classes, the mean over the foreground classes.
  """
  probs, targets = _probs_and_targets(logits, labels)
  axes = tuple(range(probs.ndim - 1))
  intersection = jnp.sum(probs * targets, axis=axes)
  denominator = jnp.sum(probs, axis=axes) + jnp.sum(targets, axis=axes)
  return jnp.mean(1.0 - (2.0 * intersection + smooth) / (denominator + smooth))


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Eq. (12): mean binary cross-entropy (K = 1) or softmax cross-entropy (K > 1) per pixel."""
  logits = logits.astype(at_least_float32(logits.dtype))
  if logits.shape[-1] == 1:
    targets = (labels == 1).astype(logits.dtype)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[..., 0], targets))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)))


def _main_loss(kind: str, logits: jax.Array, labels: jax.Array, smooth: float) -> jax.Array:
  if kind == 'dice':
    return soft_dice_loss(logits, labels, smooth)
  if kind == 'bce':
    return cross_entropy_loss(logits, labels)
  if kind == 'dice+bce':
    return soft_dice_loss(logits, labels, smooth) + cross_entropy_loss(logits, labels)
  raise ValueError(f'config.loss.main must be one of {MAIN_LOSSES}, got {kind!r}')


def segmentation_loss(outputs: dict, labels: jax.Array, config: ml_collections.ConfigDict):
  """The training loss and its terms.

  With a side output (DWS on): eq. (13)/(17), `Dice(main) + BCE(side)`, or with `config.alpha`
  set, `alpha * Dice(main) + (1 - alpha) * BCE(side)`. Without it: `config.main` on the main head.
  Returns (loss, {'loss_main': ..., 'loss_side': ...}).
  """
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
