"""A short demo training in bfloat16 compute reaches the float32 run's validation Dice.

The full EC-CaM-UNet (small widths, 48x48 synthetic slices, 240 steps of batch 4) trained twice
by the product's trainer, the same seed and data, `model.dtype` float32 and bfloat16. Measured on
the project's CPU (two simulated devices): final validation Dice 0.708 (float32) and 0.677
(bfloat16); predicting every pixel as foreground scores about 0.25 on this case, so 0.5 means the
network has learned.
"""

import json

import jax
import numpy as np
import pytest

from configs import demo
from ecm_jax.train import loop

STEPS = 240  # 5 epochs of the demo's 6 training cases at batch 4
MIN_DICE = 0.5
MARGIN = 0.1  # bfloat16's final Dice at most this far below float32's


def _final_dice_and_params(tmp, dtype):
  config = demo.get_config()
  config.data.image_size = 48
  config.data.cache_dir = str(tmp / 'cache')
  config.model.update(features=(8, 16, 32, 64, 128), mus_channels=8, side_features=(8, 8, 4),
                      cc_hidden=4, conv_impl='xla', dtype=dtype)
  config.train.update(learning_rate=2e-3, max_steps=STEPS, eval_every_epochs=5,
                      checkpoint_every_steps=STEPS, log_every_steps=STEPS)
  workdir = tmp / dtype
  state = loop.train_and_evaluate(config, workdir)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = [r['val/dice'] for r in records if 'val/dice' in r and r['step'] == STEPS]
  return final[-1], state.params


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('bf16')
  return {dtype: _final_dice_and_params(tmp, dtype) for dtype in ('float32', 'bfloat16')}


def test_bfloat16_training_reaches_the_float32_dice(runs):
  dice32, dice16 = runs['float32'][0], runs['bfloat16'][0]
  assert dice32 >= MIN_DICE, dice32
  assert dice16 >= dice32 - MARGIN, (dice16, dice32)


def test_bfloat16_training_keeps_float32_parameters(runs):
  leaves = jax.tree.leaves(runs['bfloat16'][1])
  assert leaves and all(leaf.dtype == np.float32 for leaf in leaves)
