"""Fine-tune a pretrained PNet-LLaMA (or LLaMA) folder as an SST-2 classifier: the command line of `pnet.finetune`.

    python scripts/finetune_sst2.py MODEL_DIR                                  # Hub: nyu-mll/glue sst2
    python scripts/finetune_sst2.py MODEL_DIR data.data_dir=bundled epochs=3   # offline: eval/data/sst2

``--help`` lists every setting with its default; ``--trust-remote-code`` runs the folder's own modeling code.
"""

from pnet.finetune import cli

if __name__ == "__main__":
    cli()
