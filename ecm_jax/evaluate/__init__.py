"""Evaluation: metrics (the paper's eqs. 14-16, 3D Dice, HD95), inference from a run, evaluation of
a split and prediction of new scans, the results tables and the pictures."""
