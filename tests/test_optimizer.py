"""The optimizer is PyTorch's Adam(weight_decay) (L2 before the moments) with per-step cosine decay."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from ecm_jax.train import train_state


def _config(lr=1e-2, wd=1e-1):
  config = default.get_config()
  config.train.learning_rate = lr
  config.train.weight_decay = wd
  return config


def test_cosine_schedule_spans_the_run():
  sched = train_state.learning_rate_schedule(_config(lr=1e-5), total_steps=100)
  np.testing.assert_allclose(float(sched(0)), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(50)), 0.5e-5, rtol=1e-5)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-12)


def _numpy_adam_l2(params, grads_seq, lr, wd, total):
  """Reference: torch.optim.Adam(weight_decay=wd) with lr_t = lr * (1 + cos(pi t / T)) / 2."""
  m = np.zeros_like(params)
  v = np.zeros_like(params)
  p = params.copy()
  for t, g in enumerate(grads_seq, start=1):
    g = g + wd * p
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    lr_t = lr * 0.5 * (1 + math.cos(math.pi * (t - 1) / total))
    p = p - lr_t * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
  return p


def test_adam_with_l2_matches_reference():
  rng = np.random.default_rng(0)
  params = rng.normal(size=(5,)).astype(np.float64)
  grads = [rng.normal(size=(5,)) for _ in range(6)]
  tx = train_state.make_optimizer(_config(), total_steps=6)
  p = jnp.asarray(params, jnp.float32)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(np.asarray(p), _numpy_adam_l2(params, grads, 1e-2, 1e-1, 6),
                             rtol=1e-5, atol=1e-6)


def test_adam_with_l2_matches_torch():
  torch = pytest.importorskip('torch', reason='PyTorch (requirements-torch.txt) not installed')
  rng = np.random.default_rng(1)
  params = rng.normal(size=(4, 3)).astype(np.float32)
  grads = [rng.normal(size=(4, 3)).astype(np.float32) for _ in range(5)]
  w = torch.nn.Parameter(torch.tensor(params))
  opt = torch.optim.Adam([w], lr=1e-2, weight_decay=1e-1)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
  for g in grads:
    w.grad = torch.tensor(g)
    opt.step()
    sched.step()
  tx = train_state.make_optimizer(_config(), total_steps=5)
  p = jnp.asarray(params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
  np.testing.assert_allclose(np.asarray(p), w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_is_not_adamw():
  """With zero gradients, L2-in-gradient Adam moves params by ~lr (normalised), AdamW by lr*wd*p."""
  tx = train_state.make_optimizer(_config(lr=1e-2, wd=1e-1), total_steps=10)
  p = jnp.full((3,), 2.0)
  updates, _ = tx.update(jnp.zeros(3), tx.init(p), p)
  np.testing.assert_allclose(np.asarray(updates), -1e-2, rtol=1e-4)
