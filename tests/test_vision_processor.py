"""ParameterNetImageProcessor: PIL / numpy / torch inputs, grey and RGB, channel conversion, Auto loading."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline
from transformers.image_utils import load_image
from vision_helpers import randomize_batch_norms

from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification, ParameterNetImageProcessor

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (40, 60), dtype=np.uint8)


def rgb_processor(**kwargs) -> ParameterNetImageProcessor:
    return ParameterNetImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, **kwargs)


def grey_processor(**kwargs) -> ParameterNetImageProcessor:
    return ParameterNetImageProcessor(
        size={"height": 28, "width": 28}, do_center_crop=False, do_convert_grayscale=True,
        image_mean=[0.5], image_std=[0.5], **kwargs,
    )


def pil_images() -> dict[str, Image.Image]:
    """One image per PIL mode, each with content that its raw array misreads: palette indices, 1-bit, alpha, ink,
    16-bit values above 255, floats outside [0, 255]."""
    rng = np.random.default_rng(1)
    alpha = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    return {
        "L": Image.fromarray(GREY),
        "P": Image.fromarray(RGB).quantize(64),
        "1": Image.fromarray(GREY).convert("1"),
        "LA": Image.fromarray(np.stack([GREY, alpha], axis=-1), "LA"),
        "RGB": Image.fromarray(RGB),
        "RGBA": Image.fromarray(np.dstack([RGB, alpha]), "RGBA"),
        "CMYK": Image.frombytes("CMYK", (60, 40), rng.integers(0, 256, (40, 60, 4), dtype=np.uint8).tobytes()),
        "I;16": Image.fromarray(rng.integers(0, 400, (40, 60), dtype=np.uint16)),
        "F": Image.fromarray(rng.uniform(-20.0, 300.0, (40, 60)).astype(np.float32)),
    }


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


def mismatches(processor: ParameterNetImageProcessor, pairs) -> list[str]:
    """The names of the (image, reference image) pairs that the processor does not map to the same pixel values."""
    bad = []
    for name, image, reference in pairs:
        try:
            out = processor(image, return_tensors="pt").pixel_values
        except ValueError as error:
            bad.append(f"{name}: {error}")
            continue
        expected = processor(reference, return_tensors="pt").pixel_values
        if out.shape != expected.shape or not torch.equal(out, expected):
            bad.append(f"{name}: {tuple(out.shape)} vs {tuple(expected.shape)}")
    return bad


def test_every_pil_mode_becomes_pil_luma_for_grayscale_models():
    # Palette indices, 1-bit, CMYK ink or 16-bit values read as intensities, or grey+alpha refused, were the defect.
    processor = grey_processor()
    images = pil_images()
    assert {image.mode for image in images.values()} == set(images)
    pairs = [(mode, image, image.convert("L")) for mode, image in images.items()]
    assert mismatches(processor, pairs) == []
    assert processor(images["LA"], return_tensors="pt").pixel_values.shape == (1, 1, 28, 28)


def test_every_pil_mode_becomes_pil_rgb_for_rgb_models():
    # As `image.convert("RGB")` (the training transform's and the pipeline's conversion): alpha dropped, not blended.
    pairs = [(mode, image, image.convert("RGB")) for mode, image in pil_images().items()]
    assert mismatches(rgb_processor(), pairs) == []


def test_processor_agrees_with_the_pipelines_image_loading():
    # The image-classification pipeline hands the processor `load_image(image)`, an RGB image.
    pairs = [(mode, image, load_image(image)) for mode, image in pil_images().items()]
    assert mismatches(grey_processor(), pairs) == []
    assert mismatches(rgb_processor(), pairs) == []


def test_grayscale_pipeline_scores_match_processor_and_model():
    config = ParameterNetConfig(
        num_channels=1, image_size=28, width_multiplier=0.5, stages=[[[3, 16, 16, 0, 1]], [[3, 48, 24, 0.25, 2]]],
        feature_channels=32, head_channels=32, num_labels=5,
    )
    torch.manual_seed(0)
    model = randomize_batch_norms(ParameterNetForImageClassification(config)).eval()
    processor = grey_processor()
    classifier = pipeline("image-classification", model=model, image_processor=processor)
    images = pil_images()
    for mode in ("P", "1", "CMYK"):
        image = images[mode]
        with torch.no_grad():
            logits = model(processor(image, return_tensors="pt").pixel_values).logits[0]
        scores = {p["label"]: p["score"] for p in classifier(image, top_k=5)}
        expected = logits.softmax(-1)
        for index, label in config.id2label.items():
            assert abs(scores[label] - float(expected[index])) < 1e-5, mode


def test_eval_transform_converts_images_as_the_train_transform():
    from pnet.config import AugmentConfig
    from pnet.vision_data import EvalTransform, TrainTransform

    # do_convert_rgb=False: the processor keeps what it is given, so only the transform's own conversion counts.
    cases = ((grey_processor(), 1), (rgb_processor(), 3), (rgb_processor(do_convert_rgb=False), 3))
    for processor, num_channels in cases:
        train_mode = TrainTransform(processor, AugmentConfig(), num_channels).mode
        images = list(pil_images().values())
        evaluate = EvalTransform(processor)
        out = evaluate({"image": images, "label": [0] * len(images)})["pixel_values"]
        expected = evaluate({"image": [image.convert(train_mode) for image in images], "label": [0] * len(images)})
        torch.testing.assert_close(out, expected["pixel_values"], rtol=0, atol=0)
