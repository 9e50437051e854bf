"""Replicate the paper's Table 7 at small scale (dense LLaMA vs ParameterNet rows): the command line of `experiments.table7`.

    python scripts/replicate_table7.py --config configs/replicate/table7-cpu.yaml [--rows dense,up-e8] [key=value ...]

``--help`` lists every config key.
"""

from experiments.table7 import cli

if __name__ == "__main__":
    cli()
