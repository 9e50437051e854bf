"""Dense vs ParameterNet-upcycled continued pretraining of a real LLaMA: the command line of
`experiments.upcycle_smollm2`.

    python scripts/upcycle_smollm2.py --config configs/replicate/upcycle-smollm2.yaml [key=value ...] [--dry-run]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ lives at the repository root

from experiments.upcycle_smollm2 import cli  # noqa: E402

if __name__ == "__main__":
    cli()
