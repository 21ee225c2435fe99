"""The optimizer of `ecm_jax.train.train_state` (the paper's Section IV-C) in torch, and one train step.

`torch.optim.Adam(weight_decay=wd)` adds wd * param to the gradient before the moments, which is
what `train_state.make_optimizer` chains in optax; `LambdaLR` gives step t (0-based) the learning rate
lr * 0.5 * (1 + cos(pi * min(t, T) / T)), optax's `cosine_decay_schedule(lr, T)` at count t.
"""

import math

import ml_collections
import torch

from ecm_jax.torch_ref import losses


def cosine_factor(step: int, total_steps: int) -> float:
  """The factor of `train_state.learning_rate_schedule` at `step`: cosine from 1 to 0 over the run."""
  total = max(total_steps, 1)
  return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def make_optimizer(model: torch.nn.Module, config: ml_collections.ConfigDict, total_steps: int):
  """(Adam with L2 weight decay on every parameter, its per-step cosine LambdaLR)."""
  optimizer = torch.optim.Adam(model.parameters(), lr=config.train.learning_rate,
                               betas=(0.9, 0.999), eps=1e-8,
                               weight_decay=config.train.weight_decay)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda step: cosine_factor(step, total_steps))
  return optimizer, scheduler


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               batch: dict, loss_config: ml_collections.ConfigDict) -> dict:
  """One optimizer step in train mode on `batch` ({'image' (B,C,H,W), 'label' (B,H,W)}), as
  `step.train_step`; returns the loss and its terms (floats)."""
  model.train()
  optimizer.zero_grad()
  loss, terms = losses.segmentation_loss(model(batch['image']), batch['label'], loss_config)
  loss.backward()
  optimizer.step()
  scheduler.step()
  return {'loss': loss.item(), **{k: v.item() for k, v in terms.items()}}
