"""Pretrain a dense LLaMA or a PNet-LLaMA on a streamed text mix: the command line of `pnet.pretrain`.

    accelerate launch [--config_file configs/accelerate/<setup>.yaml] scripts/pretrain.py \
        --config configs/pretrain/<name>.yaml [key=value ...] [--resume [--allow-change KEY ...]]

``--help`` lists every config key with its default.
"""

from pnet.pretrain import cli

if __name__ == "__main__":
    cli()
