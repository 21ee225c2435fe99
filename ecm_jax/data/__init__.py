"""Data: dataset readers, the preprocessing cache, splits and the grain input pipeline (Section IV-A).

    ds = data.prepare(config.data, split_file=run_dir / 'splits.json')
    it = data.train_iterator(ds, config.data, batch_size=4, seed=config.seed)
    for batch in data.eval_batches(ds, 'val', batch_size=8): ...
    slices, meta = data.load_scan('scan.nii.gz', config.data)
    data.write_prediction(masks, meta, 'mask.nii.gz')

Every bad input raises `DataError` (a ValueError) naming the file and the problem.
"""

from ecm_jax.data.dataset import PreparedDataset, SliceSource, check_config, prepare
from ecm_jax.data.export import load_scan, write_prediction
from ecm_jax.data.meta import CaseMeta
from ecm_jax.data.pipeline import eval_batches, steps_per_epoch, train_iterator
from ecm_jax.errors import DataError

__all__ = [
    'CaseMeta', 'DataError', 'PreparedDataset', 'SliceSource', 'check_config', 'eval_batches',
    'load_scan', 'prepare', 'steps_per_epoch', 'train_iterator', 'write_prediction',
]
