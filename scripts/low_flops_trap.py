"""The low-FLOPs trap in miniature (GhostNet / ParameterNet / RepConv on 10% and 100% of Fashion-MNIST): the command
line of `experiments.low_flops_trap`.

    nice -n 5 python scripts/low_flops_trap.py --config configs/replicate/low-flops-trap.yaml [key=value ...]

``--help`` lists every config key. Re-running the same command skips finished runs and continues interrupted ones.
"""

from experiments.low_flops_trap import cli

if __name__ == "__main__":
    cli()
