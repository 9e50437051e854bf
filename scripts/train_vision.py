"""Train a GhostNet / ParameterNet image classifier with the paper's recipe: the command line of `pnet.vision_train`.

    accelerate launch scripts/train_vision.py --config configs/vision/train-imagenet-paper.yaml
    python scripts/train_vision.py --config configs/vision/train-fmnist-cpu.yaml \
        model=configs/vision/fmnist-parameternet.json output_dir=runs/fmnist-parameternet
    python scripts/train_vision.py --config ... --resume          # continue from the last checkpoint

``--help`` lists every config key with its default.
"""

from pnet.vision_train import cli

if __name__ == "__main__":
    cli()
