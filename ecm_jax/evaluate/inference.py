"""A trained run ready for inference: its config, restored variables, EC fold, batched prediction
sharded over this process's devices."""

import pathlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from ecm_jax import config as config_lib
from ecm_jax.errors import WorkdirError
from ecm_jax.models.fold import fold_ec, has_ec_blocks
from ecm_jax.models.networks import attention_maps, build_model
from ecm_jax.train import checkpoint, sharding, step
from ecm_jax.train import workdir as workdir_lib


def batched_logits(logits_fn, variables, images: np.ndarray, batch_size: int) -> np.ndarray:
  """`logits_fn(variables, x)` (N,S,S,K) of slices `images` (N,S,S,C) in batches of `batch_size`,
  the last one zero-padded so that every call has one (compiled) shape."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    out.append(logits_fn(variables, chunk)[:batch_size - pad])
  return np.concatenate(jax.device_get(out)) if out else np.zeros((0,), np.float32)


class Predictor:
  """The model of a training run, restored from one of its checkpoints.

  With `fold=True` (default) an EC model is converted to its deploy form (one 3x3 conv with bias per
  EC block, `ecm_jax.models.fold`): same output, fewer convolutions. The variables are replicated
  on this process's devices and each batch is split over them (`batch_size` is rounded up to a
  multiple of their number).
  """

  def __init__(self, workdir, checkpoint_name: str = 'best', *,
               config: ml_collections.ConfigDict | None = None, fold: bool = True,
               batch_size: int | None = None):
    self.workdir = pathlib.Path(workdir)
    if not self.workdir.is_dir():
      raise WorkdirError(f'{self.workdir}: no such run directory')
    self.config = workdir_lib.load_run_config(self.workdir)
    if config is not None:
      # The model is what the checkpoints mean; data and train keys may differ (another data.root).
      diff = config_lib.differences({'model': config_lib.to_dict(self.config.model)},
                                    {'model': config_lib.to_dict(config.model)})
      if diff:
        raise WorkdirError(
            f'the checkpoints in {self.workdir} were trained with a different model config than '
            f'the one given:\n  ' + '\n  '.join(diff))
    self.model = build_model(self.config.model)
    mesh = sharding.make_mesh(jax.local_devices())
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    self.step, self.variables = checkpoint.restore_variables(
        self.workdir, self.config, checkpoint_name, replicated)
    self.deploy_model, self.deploy_variables = self.model, self.variables
    if fold and has_ec_blocks(self.config.model):
      deploy_config, self.deploy_variables = fold_ec(self.config.model, self.variables)
      self.deploy_model = build_model(deploy_config)
    devices = mesh.devices.size
    self.batch_size = -(-(batch_size or self.config.train.eval_batch_size) // devices) * devices
    self._logits = jax.jit(lambda v, x: self.deploy_model.apply(v, x, train=False)['logits'],
                           in_shardings=(replicated, rows), out_shardings=rows)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Main-head logits (N,S,S,K) of preprocessed slices (N,S,S,C), in fixed-size batches."""
    return batched_logits(self._logits, self.deploy_variables, images, self.batch_size)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Class maps (N,S,S) uint8 of preprocessed slices (N,S,S,C)."""
    return np.asarray(step.classes_from_logits(self.logits(images))).astype(np.uint8)

  def attention(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """The sow'd attention maps (S, Theta, F_A) of one slice (S,S,C), from the unfolded model."""
    _, state = self.model.apply(self.variables, jnp.asarray(image)[None], train=False,
                                mutable=['intermediates'])
    return {k: np.asarray(v[0]) for k, v in attention_maps(state.get('intermediates', {})).items()}
