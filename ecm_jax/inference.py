"""A trained run ready for inference: its config, restored variables, EC fold, batched prediction."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ecm_jax import checkpoint
from ecm_jax import training
from ecm_jax.fold import fold_ec, has_ec_blocks
from ecm_jax.models import attention_maps, build_model


def batched_logits(logits_fn, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
  """`logits_fn(variables, x)` (N,S,S,K) of slices `images` (N,S,S,C) in batches of `batch_size`,
  the last one zero-padded so that every call has one (compiled) shape."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out.append(logits_fn(variables, jnp.asarray(chunk))[:batch_size - pad])
  return np.concatenate(jax.device_get(out)) if out else np.zeros((0,), np.float32)


def _model_differences(run_model: ml_collections.ConfigDict,
                       given_model: ml_collections.ConfigDict) -> list[str]:
  return checkpoint.config_differences({'model': run_model.to_dict()},
                                       {'model': given_model.to_dict()})


class Predictor:
  """The model of a training run, restored from one of its checkpoints.

  With `fold=True` (default) an EC model is converted to its deploy form (one 3x3 conv with bias per
  EC block, `ecm_jax.fold`): same output, fewer convolutions.
  """

  def __init__(self, workdir, checkpoint_name: str = 'best', *,
               config: ml_collections.ConfigDict | None = None, fold: bool = True,
               batch_size: int | None = None):
    self.workdir = pathlib.Path(workdir)
    if not self.workdir.is_dir():
      raise checkpoint.WorkdirError(f'{self.workdir}: no such run directory')
    self.config = checkpoint.load_run_config(self.workdir)
    if config is not None:
      diff = _model_differences(self.config.model, config.model)
      if diff:
        raise checkpoint.WorkdirError(
            f'the checkpoints in {self.workdir} were trained with a different model config than '
            f'the one given:\n  ' + '\n  '.join(diff))
    manager = checkpoint.checkpoint_manager(self.workdir, 1, read_only=True)
    self.step = checkpoint.resolve_step(manager, checkpoint_name)
    self.model = build_model(self.config.model)
    tx = training.make_optimizer(self.config, total_steps=1)  # only its state's structure is used
    size, channels = self.config.data.image_size, self.config.model.in_channels
    abstract = jax.eval_shape(lambda: training.create_train_state(
        self.model, tx, 0, (size, size, channels)))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            abstract)
    try:
      state = checkpoint.restore(manager, self.step, abstract)
    except (ValueError, KeyError, TypeError) as e:
      raise checkpoint.WorkdirError(
          f'checkpoint {self.step} in {manager.directory} does not fit the model of '
          f'{self.workdir / "config.json"} ({type(e).__name__}: {e})') from e
    finally:
      manager.close()
    self.variables = {'params': state.params, 'batch_stats': state.batch_stats}
    self.deploy_model, self.deploy_variables = self.model, self.variables
    if fold and has_ec_blocks(self.config.model):
      deploy_config, self.deploy_variables = fold_ec(self.config.model, self.variables)
      self.deploy_model = build_model(deploy_config)
    self.batch_size = batch_size or self.config.train.eval_batch_size
    self._logits = jax.jit(lambda v, x: self.deploy_model.apply(v, x, train=False)['logits'])

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Main-head logits (N,S,S,K) of preprocessed slices (N,S,S,C), in fixed-size batches."""
    return batched_logits(self._logits, self.deploy_variables, images, self.batch_size)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Class maps (N,S,S) uint8 of preprocessed slices (N,S,S,C)."""
    return np.asarray(training.classes_from_logits(self.logits(images))).astype(np.uint8)

  def attention(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """The sow'd attention maps (S, Theta, F_A) of one slice (S,S,C), from the unfolded model."""
    _, state = self.model.apply(self.variables, jnp.asarray(image)[None], train=False,
                                mutable=['intermediates'])
    return {k: np.asarray(v[0]) for k, v in attention_maps(state.get('intermediates', {})).items()}
