"""Experiments: runners that reproduce the paper's results by calling the training and evaluation functions.

They sit above `pnet` (training) and `pnet_eval` (evaluation) and import both; nothing imports them.

- `experiments.table7` (``scripts/replicate_table7.py``): Table 7 at small scale, dense LLaMA vs ParameterNet rows.
- `experiments.low_flops_trap` (``scripts/low_flops_trap.py``): the low-FLOPs trap on Fashion-MNIST.
"""
