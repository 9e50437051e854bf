"""Dense vs ParameterNet-upcycled continued pretraining of a real LLaMA: the command line of
`experiments.upcycle_smollm2`.

    python scripts/upcycle_smollm2.py --config configs/replicate/upcycle-smollm2.yaml [key=value ...] [--dry-run]
"""

from experiments.upcycle_smollm2 import cli

if __name__ == "__main__":
    cli()
