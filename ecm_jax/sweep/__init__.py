"""Sweeps: the rows of a paper table x seeds, each trained and evaluated by train.py and eval.py,
then one table with mean ± sd over seeds and a paired comparison with a baseline row.

  python -m ecm_jax.sweep --config configs/msd_heart.py --rows unet,ec_cam_unet --seeds 0,1,2 \
      --out sweeps/NAME [--launcher local|slurm|submitit_local] [--config.key=value ...]

`runs`: one run of a sweep (its folder, its state, the train/eval processes); `launchers`: where
the runs go (this machine, one after another or one per local device; SLURM through submitit);
`table`: the figures, statistics and files of the table. The command is `__main__`
(docs/reproduce.md).
"""
