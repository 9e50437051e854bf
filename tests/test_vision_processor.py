"""ParameterNetImageProcessor: PIL / numpy / torch inputs, grey and RGB, channel conversion, Auto loading."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_parameternet import ParameterNetImageProcessor

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (40, 60), dtype=np.uint8)


def rgb_processor(**kwargs) -> ParameterNetImageProcessor:
    return ParameterNetImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, **kwargs)


def test_rgb_inputs_agree_across_types():
    processor = rgb_processor()
    inputs = [Image.fromarray(RGB), RGB, RGB.transpose(2, 0, 1), torch.from_numpy(RGB.transpose(2, 0, 1).copy())]
    outputs = [processor(x, return_tensors="pt").pixel_values for x in inputs]
    assert outputs[0].shape == (1, 3, 32, 32) and outputs[0].dtype == torch.float32
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0])
    # ImageNet normalisation of the centre crop: check one pixel by hand.
    manual = processor.resize(RGB.transpose(2, 0, 1), size=processor.size, resample=processor.resample)
    manual = processor.center_crop(manual, processor.crop_size)[:, 0, 0] / 255.0
    expected = (manual - np.array(processor.image_mean)) / np.array(processor.image_std)
    np.testing.assert_allclose(outputs[0][0, :, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_grey_inputs_become_rgb_for_three_channel_models():
    processor = rgb_processor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    inputs = [Image.fromarray(GREY), GREY, GREY[None], GREY[..., None], torch.from_numpy(GREY.copy())]
    outputs = [processor(x, return_tensors="pt").pixel_values for x in inputs]
    for out in outputs:
        assert out.shape == (1, 3, 32, 32)
        torch.testing.assert_close(out, outputs[0])
        torch.testing.assert_close(out[:, 0], out[:, 2])  # grey replicated to R, G and B


def test_grayscale_mode_for_one_channel_models():
    processor = ParameterNetImageProcessor(
        size={"height": 28, "width": 28}, do_center_crop=False, do_convert_grayscale=True, image_mean=[0.5], image_std=[0.5]
    )
    grey = processor([Image.fromarray(GREY), GREY], return_tensors="pt").pixel_values
    assert grey.shape == (2, 1, 28, 28)
    torch.testing.assert_close(grey[0], grey[1])
    from_rgb = processor(Image.fromarray(RGB), return_tensors="pt").pixel_values
    from_pil_l = processor(Image.fromarray(RGB).convert("L"), return_tensors="pt").pixel_values
    assert from_rgb.shape == (1, 1, 28, 28)
    torch.testing.assert_close(from_rgb, from_pil_l, atol=2 / 255 / 0.5, rtol=0)  # PIL's luma rounds to uint8


def test_batch_of_mixed_sizes_and_bad_channels():
    processor = rgb_processor()
    batch = processor([RGB, RNG.integers(0, 256, (100, 50, 3), dtype=np.uint8)], return_tensors="pt").pixel_values
    assert batch.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        processor(RNG.integers(0, 256, (5, 40, 40), dtype=np.uint8))


def test_save_and_auto_load(tmp_path):
    processor = rgb_processor(do_convert_grayscale=False)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "ParameterNetImageProcessor"
    assert loaded.crop_size == processor.crop_size and loaded.size == processor.size
    torch.testing.assert_close(loaded(RGB, return_tensors="pt").pixel_values, processor(RGB, return_tensors="pt").pixel_values)
