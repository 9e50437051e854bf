"""Image processor for GhostNet / ParameterNet on the PIL/NumPy backend (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ImageInput,
    PILImageResampling,
    is_pil_image,
)
from transformers.processing_utils import ImagesKwargs, Unpack

from .transformers_version import TRANSFORMERS_REQUIREMENT  # noqa: F401  (checks the installed release)

# ITU-R 601-2 luma, the weights PIL uses for mode "L".
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _is_2d_array(image: object) -> bool:
    return isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 2


class ParameterNetImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_convert_grayscale (`bool`, *optional*, defaults to `self.do_convert_grayscale`):
        Convert every image to one luma channel (for single-channel models such as the Fashion-MNIST ones).
        Takes precedence over `do_convert_rgb`.
    """

    do_convert_grayscale: bool


class ParameterNetImageProcessor(PilBackend):
    """Resize (shorter side), center-crop, rescale to [0, 1] and normalise; PIL images, numpy arrays or tensors,
    grey (H, W) / (1, H, W) or RGB, channels first or last. Grey inputs are replicated to RGB for 3-channel models
    (`do_convert_rgb`) or RGB inputs reduced to luma for 1-channel models (`do_convert_grayscale`). PIL images of any
    mode are converted by PIL itself (`image.convert("L")` / `image.convert("RGB")`), as in training and the pipeline.

    Defaults are the ImageNet evaluation transform of the paper's models: shorter side 256 (bilinear), 224 center crop,
    ImageNet mean / std.
    """

    valid_kwargs = ParameterNetImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_convert_grayscale = False

    def __init__(self, **kwargs: Unpack[ParameterNetImageProcessorKwargs]):
        super().__init__(**kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        # A grey (H, W) array or tensor is one single-channel image, not a batch of rows: give it a channel axis.
        if isinstance(images, (list, tuple)):
            images = [image[None] if _is_2d_array(image) else image for image in images]
        elif _is_2d_array(images):
            images = images[None]
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format=None,
        do_convert_grayscale: bool | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One image to a channels-first array with 3 channels (RGB) or 1 channel (grayscale)."""
        if do_convert_grayscale is None:
            do_convert_grayscale = self.do_convert_grayscale
        if do_convert_rgb is None:
            do_convert_rgb = self.do_convert_rgb
        if is_pil_image(image) and (do_convert_grayscale or do_convert_rgb):
            # PIL converts every mode (P, 1, LA, RGBA, CMYK, I;16, F, ...) itself, as the training transforms and the
            # image-classification pipeline do: `image.convert("L")` luma, or `image.convert("RGB")` (alpha dropped).
            image = image.convert("L" if do_convert_grayscale else "RGB")
            do_convert_rgb = False
        image = super().process_image(
            image, do_convert_rgb=do_convert_rgb and not do_convert_grayscale, input_data_format=input_data_format
        )
        channels = image.shape[0]
        if channels not in (1, 3, 4):
            raise ValueError(
                f"image with {channels} channels (shape {image.shape}); allowed: 1 (grey), 3 (RGB) or 4 (RGBA)"
            )
        if do_convert_grayscale:
            if channels == 1:
                return image
            luma = np.tensordot(LUMA_WEIGHTS, image[:3].astype(np.float32), axes=1)
            return luma[None].astype(image.dtype) if image.dtype == np.uint8 else luma[None]
        if channels == 1 and do_convert_rgb:
            # Grey arrays and tensors: transformers before 5.24 converts only PIL images to RGB.
            return np.repeat(image, 3, axis=0)
        return image


ParameterNetImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["ParameterNetImageProcessor"]
