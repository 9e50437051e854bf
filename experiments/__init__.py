"""Experiments: runners that reproduce the paper's results by calling the training and evaluation functions.

They sit above `pnet` (training) and `pnet_eval` (evaluation) and import both; nothing imports them. Each is one
resumable command that writes a report page under results/.

- `experiments.table7` (``scripts/replicate_table7.py``): Table 7 at small scale, dense LLaMA vs ParameterNet rows.
- `experiments.low_flops_trap` (``scripts/low_flops_trap.py``): the low-FLOPs trap on Fashion-MNIST.
- `experiments.upcycle_smollm2` (``scripts/upcycle_smollm2.py``): dense vs upcycled continued pretraining of a real
  LLaMA (SmolLM2-135M).
"""
