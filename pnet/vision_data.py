"""Image data for GhostNet / ParameterNet training: loading and augmentation, written on PIL and torch (no torchvision).

* `load_image_dataset` returns a `datasets.DatasetDict` with an `image` (PIL) and a `label` (ClassLabel) column from
  a Hub id (e.g. ImageNet), a local `imagefolder` directory or a folder of MNIST-style IDX `.gz` files
  (Fashion-MNIST); every source then goes through the same transforms and training loop.
* `stratified_subset`: a fixed, seeded share of a split drawn per class (``data.train_subset``), the same for every
  run that asks for it whatever the run's own seed.
* `RandAugment` (Cubuk et al. 2020, the timm `rand-m9-mstd0.5` flavour), `RandomErasing` (Zhong et al. 2020, per-pixel
  normal noise as in timm), `random_resized_crop` and `TrainTransform` / `EvalTransform`, which end in the model's
  `ParameterNetImageProcessor` so training and inference normalise identically.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import random
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from pnet.config import AugmentConfig
from pnet.data import MAX_BAD_RECORD_EXAMPLES, DataRecordError, RecordCheck

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def read_idx(path: str) -> np.ndarray:
    """Read a gzip-compressed IDX file (big-endian header: magic, dims, then uint8 data)."""
    with gzip.open(path) as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in (2049, 2051):
        raise ValueError(f"{path!r} is not an IDX label (2049) or image (2051) file: magic {magic}")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def is_idx_folder(path: str) -> bool:
    return os.path.isdir(path) and all(os.path.isfile(os.path.join(path, f)) for f in IDX_FILES["train"])


def local_data_files(path: str) -> list[str]:
    """The local files `load_image_dataset(path)` reads (an IDX folder's four, every file of an imagefolder), whose
    content hashes `--resume` compares; none for a Hub id."""
    if is_idx_folder(path):
        return [os.path.join(path, name) for split in IDX_FILES.values() for name in split]
    if os.path.isdir(path):
        return sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    return []


def load_idx_dataset(path: str, label_names: list[str] | None = None, limit: int | None = None) -> datasets.DatasetDict:
    """An IDX folder (Fashion-MNIST layout) as a DatasetDict with splits `train` and `test` of PIL images."""
    label_names = label_names or FASHION_MNIST_LABELS
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=label_names)})
    splits = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        images = read_idx(os.path.join(path, images_file))[:limit]
        labels = read_idx(os.path.join(path, labels_file))[:limit]
        if len(images) != len(labels):
            raise ValueError(f"{path!r} split {split!r}: {len(images)} images but {len(labels)} labels")
        splits[split] = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
    return datasets.DatasetDict(splits)


def load_image_dataset(
    path: str, name: str | None = None, limit: int | None = None, streaming: bool = False
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """A Hub id (`load_dataset(path, name)`), an `imagefolder` directory, or an IDX folder.

    `limit` keeps the first `limit` examples of every split (for quick runs and tests).
    """
    if is_idx_folder(path):
        return load_idx_dataset(path, limit=limit)
    if os.path.isdir(path):
        data = datasets.load_dataset("imagefolder", data_dir=path, streaming=streaming)
    else:
        data = datasets.load_dataset(path, name, streaming=streaming)
    if limit is not None:
        if streaming:
            data = type(data)({split: ds.take(limit) for split, ds in data.items()})
        else:
            data = datasets.DatasetDict({split: ds.select(range(min(limit, len(ds)))) for split, ds in data.items()})
    return data


def check_images(dataset: datasets.Dataset, source: str, split: str,
                 on_bad_record: str = "error") -> tuple[datasets.Dataset, RecordCheck]:
    """Open and verify every image of ``dataset`` (PIL's ``verify``: the header and the data's integrity, without
    decoding pixels) before training: a corrupt file crashed training in a later epoch, or not at all in a short run.
    "error" raises naming the first bad file; "skip" returns the dataset without the bad images and their count."""
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    bad: list[int] = []
    examples: list[str] = []
    for index, item in enumerate(raw.select_columns(["image"])):
        image = item["image"]
        where = image.get("path") or f"row {index + 1}"
        try:
            with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as opened:
                opened.verify()
        except (OSError, SyntaxError, ValueError) as error:  # PIL's ways of saying "not a (whole) image"
            problem = f"{where}: not a readable image ({type(error).__name__}: {error})"
            if on_bad_record == "error":
                raise DataRecordError(f"{source} ({split}): {problem}. Replace or remove the file, or set "
                                      "data.on_bad_record=skip to leave it out (counted in the log)") from None
            bad.append(index)
            if len(examples) < MAX_BAD_RECORD_EXAMPLES:
                examples.append(problem)
    kept = dataset.select(sorted(set(range(len(dataset))) - set(bad))) if bad else dataset
    return kept, RecordCheck(source, split, len(dataset), len(bad), tuple(examples))


def stratified_subset(dataset: datasets.Dataset, fraction: float, seed: int,
                      label_column: str = "label") -> datasets.Dataset:
    """A fixed share of ``dataset`` drawn per class: each class keeps round(fraction x its count) examples (at least
    one), so a balanced dataset gives a balanced subset and an unbalanced one keeps its class shares.

    The draw depends only on (labels, fraction, seed), not on any training seed: every run asking for the same
    share sees the same examples. Each class's examples are permuted once by ``seed`` and the first ones kept, so
    a smaller share's subset lies inside a larger one's. The examples keep the dataset's order.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"train subset fraction={fraction} invalid; allowed: 0 < fraction <= 1")
    if fraction == 1:
        return dataset
    labels = np.asarray(dataset[label_column])
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep.append(rng.permutation(members)[: max(1, round(fraction * len(members)))])
    return dataset.select(np.sort(np.concatenate(keep)).tolist())


# --- augmentation -----------------------------------------------------------------------------------------------------


def _fill(image: Image.Image) -> int | tuple[int, ...]:
    return 128 if image.mode == "L" else (128,) * len(image.getbands())


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_fill(image))


class RandAugment:
    """Apply `num_ops` random operations at magnitude ~ N(magnitude, magnitude_std) on a 0-10 scale (timm flavour).

    Geometric ops fill with grey; signed ops pick the sign at random.
    """

    OPS = (
        "identity", "auto_contrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
        "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
    )

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5, max_magnitude: float = 10.0):
        if num_ops < 0 or not 0 <= magnitude <= max_magnitude:
            raise ValueError(f"RandAugment num_ops={num_ops} (>= 0) magnitude={magnitude} (0..{max_magnitude}) invalid")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.max_magnitude = max_magnitude

    def __call__(self, image: Image.Image, rng: random.Random = random) -> Image.Image:
        for op in rng.choices(self.OPS, k=self.num_ops):
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = rng.gauss(magnitude, self.magnitude_std)
            level = min(max(magnitude, 0.0), self.max_magnitude) / self.max_magnitude  # in [0, 1]
            sign = rng.choice((-1.0, 1.0))
            image = self.apply(image, op, level, sign)
        return image

    @staticmethod
    def apply(image: Image.Image, op: str, level: float, sign: float) -> Image.Image:
        """One operation at strength `level` in [0, 1]."""
        width, height = image.size
        if op == "identity":
            return image
        if op == "auto_contrast":
            return ImageOps.autocontrast(image)
        if op == "equalize":
            return ImageOps.equalize(image)
        if op == "rotate":
            return image.rotate(sign * 30.0 * level, resample=Image.BILINEAR, fillcolor=_fill(image))
        if op == "solarize":
            return ImageOps.solarize(image, int(256 - 256 * level))
        if op == "posterize":
            return ImageOps.posterize(image, max(1, int(8 - 4 * level)))
        if op in ("color", "contrast", "brightness", "sharpness"):
            enhancer = {
                "color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness,
            }[op]
            return enhancer(image).enhance(1.0 + sign * 0.9 * level)
        if op == "shear_x":
            return _affine(image, (1, sign * 0.3 * level, 0, 0, 1, 0))
        if op == "shear_y":
            return _affine(image, (1, 0, 0, sign * 0.3 * level, 1, 0))
        if op == "translate_x":
            return _affine(image, (1, 0, sign * 0.45 * level * width, 0, 1, 0))
        if op == "translate_y":
            return _affine(image, (1, 0, 0, 0, 1, sign * 0.45 * level * height))
        raise ValueError(f"RandAugment op {op!r} unknown; allowed: {RandAugment.OPS}")


class RandomErasing:
    """With probability `probability`, replace a random rectangle of a normalised (C, H, W) tensor by N(0, 1) noise.

    Area fraction ~ U(min_area, max_area), aspect ratio log-uniform in (min_aspect, 1 / min_aspect).
    """

    def __init__(self, probability: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3):
        if not 0 <= probability <= 1:
            raise ValueError(f"random erasing probability={probability} invalid; allowed: 0 <= p <= 1")
        self.probability = probability
        self.min_area = min_area
        self.max_area = max_area
        self.log_aspect = (math.log(min_aspect), -math.log(min_aspect))

    def __call__(
        self, pixel_values: torch.Tensor, rng: random.Random = random, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if rng.random() >= self.probability:
            return pixel_values
        channels, height, width = pixel_values.shape
        for _ in range(10):  # a few tries to fit the rectangle
            area = rng.uniform(self.min_area, self.max_area) * height * width
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                pixel_values = pixel_values.clone()
                pixel_values[:, top : top + h, left : left + w] = torch.randn(channels, h, w, generator=generator)
                return pixel_values
        return pixel_values


def random_resized_crop(
    image: Image.Image, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
    rng: random.Random = random,
) -> Image.Image:
    """Crop a random area fraction `scale` and aspect `ratio` of the image and resize it to `size` (height, width)."""
    width, height = image.size
    for _ in range(10):
        area = rng.uniform(*scale) * width * height
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return image.resize((size[1], size[0]), Image.BILINEAR, box=(left, top, left + w, top + h))
    return image.resize((size[1], size[0]), Image.BILINEAR)  # fall back to the whole image


class TrainTransform:
    """PIL augmentation -> image processor (normalise) -> random erasing, for one batch.

    Every sample's randomness comes from its own seed, so the augmentation of a sample depends only on
    (run seed, epoch, index): a resumed run sees exactly the batches of an uninterrupted one, whatever the data
    loader prefetched before the checkpoint, and DataLoader workers need no reseeding.
    """

    def __init__(self, image_processor, augment: AugmentConfig, num_channels: int):
        self.image_processor = image_processor
        self.augment = augment
        self.mode = "L" if num_channels == 1 else "RGB"
        crop = image_processor.crop_size if image_processor.do_center_crop else image_processor.size
        self.size = (crop["height"], crop["width"])
        self.rand_augment = RandAugment(
            augment.rand_augment_ops, augment.rand_augment_magnitude, augment.rand_augment_magnitude_std
        )
        self.random_erasing = RandomErasing(augment.random_erasing)

    def __call__(self, batch: dict, seeds: list[int]) -> dict:
        images, rngs = [], [random.Random(seed) for seed in seeds]
        for image, rng in zip(batch["image"], rngs):
            image = image.convert(self.mode)
            image = random_resized_crop(image, self.size, tuple(self.augment.crop_scale), rng=rng)
            if rng.random() < self.augment.horizontal_flip:
                image = ImageOps.mirror(image)
            images.append(self.rand_augment(image, rng))
        pixel_values = self.image_processor(
            images, do_resize=False, do_center_crop=False, return_tensors="pt"
        ).pixel_values
        pixel_values = torch.stack([
            self.random_erasing(p, rng, torch.Generator().manual_seed(seed))
            for p, rng, seed in zip(pixel_values, rngs, seeds)
        ])
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch["label"])}


class AugmentedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` seen through a `TrainTransform`, each sample seeded by (seed, epoch, index).

    Set `epoch` before iterating each epoch. `__getitems__` lets the DataLoader fetch and augment a whole batch at once.
    """

    def __init__(self, data: datasets.Dataset, transform: TrainTransform, seed: int):
        self.data = data
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        seeds = [(self.seed * 1_000_003 + self.epoch) * len(self.data) + int(i) for i in indices]
        batch = self.transform(self.data[list(indices)], seeds)
        return [{key: value[i] for key, value in batch.items()} for i in range(len(indices))]


class EvalTransform:
    """Batch transform for evaluation: the image mode of `TrainTransform` ("L" for a grayscale image processor, else
    "RGB"), then the image processor alone (resize, center crop, normalise)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.mode = "L" if image_processor.do_convert_grayscale else "RGB"

    def __call__(self, batch: dict) -> dict:
        images = [image.convert(self.mode) for image in batch["image"]]
        pixel_values = self.image_processor(images, return_tensors="pt").pixel_values
        return {"pixel_values": pixel_values, "labels": torch.tensor(batch["label"])}


def collate(examples: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in examples[0]}
