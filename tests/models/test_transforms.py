"""Preprocess (letterbox, augmentation, normalisation) and its Geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.errors import ConfigError, DataError
from models.transforms import Geometry, Preprocess, PreprocessConfig, preprocess_images


def _cfg(size: int = 32, **kw: object) -> PreprocessConfig:
    return PreprocessConfig(image_size=size, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hw", "size", "content", "pads"),
    [
        ((178, 256), 128, (89, 128), (19, 0)),  # landscape (Kermany-like)
        ((256, 178), 128, (128, 89), (0, 19)),  # portrait
        ((64, 64), 128, (128, 128), (0, 0)),  # upsampled NIH 64 px
        ((256, 256), 224, (224, 224), (0, 0)),
    ],
)
def test_letterbox_geometry_and_padding(hw, size, content, pads) -> None:
    image = np.ones(hw, dtype=np.float32)
    x, geo = Preprocess(_cfg(size, normalize="none")).with_geometry(image)
    assert x.shape == (1, size, size) and x.dtype == torch.float32
    assert (geo.content_height, geo.content_width) == content
    assert (geo.pad_top, geo.pad_left) == pads
    top, left = pads
    inside = x[0, top : top + content[0], left : left + content[1]]
    assert torch.allclose(inside, torch.ones_like(inside))
    assert float(x.sum()) == pytest.approx(content[0] * content[1], rel=1e-5)  # zero padding


def test_stretch_mode_fills_the_square() -> None:
    x, geo = Preprocess(_cfg(32, resize="stretch", normalize="none")).with_geometry(
        np.ones((20, 40), np.float32)
    )
    assert torch.allclose(x, torch.ones_like(x))
    assert (geo.scale_y, geo.scale_x, geo.pad_top, geo.pad_left) == (1.6, 0.8, 0, 0)


def test_geometry_round_trips_points_and_boxes() -> None:
    geo = Preprocess(128).geometry(178, 256)
    for point in [(0.0, 0.0), (255.5, 177.0), (100.25, 40.0)]:
        back = geo.to_original(*geo.to_model(*point))
        assert back == pytest.approx(point)
    box = (10.0, 20.0, 50.0, 30.0)
    model_box = geo.box_to_model(box)
    assert model_box == pytest.approx((5.0, 29.0, 25.0, 15.0))
    assert geo.box_to_original(model_box) == pytest.approx(box)
    assert geo.cell_to_original(0, 0, (4, 4)) == pytest.approx((32.0, (16 - 19) / 0.5))
    assert Geometry(**geo.as_dict()) == geo


def test_a_bright_spot_lands_where_geometry_says() -> None:
    image = np.zeros((178, 256), np.float32)
    image[100:110, 200:210] = 1.0  # centre (205, 105) in original (x, y)
    x, geo = Preprocess(_cfg(128, normalize="none")).with_geometry(image)
    weights = x[0].numpy()
    rows, cols = np.indices(weights.shape)
    cy = float((weights * (rows + 0.5)).sum() / weights.sum())  # intensity centroid
    cx = float((weights * (cols + 0.5)).sum() / weights.sum())
    assert geo.to_original(cx, cy) == pytest.approx((205, 105), abs=0.5)


@pytest.mark.parametrize("mode", ["image", "fixed", "none"])
def test_normalisation(mode: str) -> None:
    image = np.random.default_rng(0).random((40, 40)).astype(np.float32)
    x = Preprocess(_cfg(32, normalize=mode, mean=0.5, std=0.25))(image)
    base = Preprocess(_cfg(32, normalize="none"))(image)
    if mode == "image":
        assert float(x.mean()) == pytest.approx(0, abs=1e-5)
        assert float(x.std()) == pytest.approx(1, abs=1e-4)
    elif mode == "fixed":
        assert torch.allclose(x, (base - 0.5) / 0.25)
    else:
        assert float(x.min()) >= 0 and float(x.max()) <= 1


def test_augmentation_is_deterministic_given_a_generator() -> None:
    image = np.random.default_rng(1).random((50, 60)).astype(np.float32)
    train = Preprocess(_cfg(32, normalize="none"), train=True)
    a = train(image, torch.Generator().manual_seed(3))
    b = train(image, torch.Generator().manual_seed(3))
    c = train(image, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, 32, 32) and float(a.min()) >= 0 and float(a.max()) <= 1
    evaluation = Preprocess(_cfg(32, normalize="none"))
    assert torch.equal(evaluation(image, torch.Generator().manual_seed(3)), evaluation(image))
    assert not torch.equal(a, evaluation(image))


def test_zero_augmentation_equals_evaluation() -> None:
    image = np.random.default_rng(2).random((30, 30)).astype(np.float32)
    cfg = _cfg(32, rotate_deg=0, translate=0, scale=0, brightness=0, contrast=0)
    assert torch.allclose(Preprocess(cfg, train=True)(image), Preprocess(cfg)(image), atol=1e-6)


def test_accepts_tensors_and_channel_first() -> None:
    t = torch.rand(1, 20, 30)
    p = Preprocess(16)
    assert torch.equal(p(t), p(t[0].numpy()))


@pytest.mark.parametrize("shape", [(3, 10, 10), (10,), (0, 5)])
def test_rejects_non_grayscale(shape) -> None:
    with pytest.raises(DataError):
        Preprocess(16)(np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    "kw",
    [
        {"image_size": 4},
        {"resize": "crop"},
        {"normalize": "imagenet"},
        {"std": 0.0},
        {"rotate_deg": -1.0},
        {"scale": 1.0},
    ],
)
def test_config_validation(kw: dict) -> None:
    with pytest.raises(ConfigError):
        PreprocessConfig(**kw)


@pytest.mark.parametrize(
    "hw",
    [(256, 256), (194, 256), (256, 178), (64, 64), (37, 91), (1024, 1024), (130, 127)],
)
@pytest.mark.parametrize("size", [32, 128, 224])
def test_letterbox_resize_is_monais_bit_for_bit(hw: tuple[int, int], size: int) -> None:
    """The plain interpolate in Preprocess.base equals MONAI's Resize exactly (the
    checkpoints were trained through MONAI's), shrinking (area) and enlarging (bilinear)."""
    from monai.transforms import Resize

    image = np.random.default_rng(hw[0] * 7 + hw[1] + size).random(hw, dtype=np.float32)
    pre = Preprocess(_cfg(size, normalize="none"))
    got, geo = pre.base(image)
    new_h, new_w = geo.content_height, geo.content_width
    x = torch.from_numpy(image)[None]
    if (new_h, new_w) != hw:
        shrinking = new_h * new_w < hw[0] * hw[1]
        resize = Resize(spatial_size=(new_h, new_w), mode="area" if shrinking else "bilinear")
        x = resize(x).as_tensor()
    top, left = geo.pad_top, geo.pad_left
    content = got[:, top : top + new_h, left : left + new_w]
    assert torch.equal(content, x.clamp(0.0, 1.0))
    assert float(got.sum()) == pytest.approx(float(content.sum()))  # the rest is padding


def test_preprocess_images_checks_every_image() -> None:
    pre = Preprocess(PreprocessConfig(image_size=16))
    batch, geometries = preprocess_images(
        pre, [np.full((20, 10), 0.5, np.float32), torch.zeros(1, 8, 8)]
    )
    assert batch.shape == (2, 1, 16, 16) and len(geometries) == 2
    with pytest.raises(DataError, match="no images"):
        preprocess_images(pre, [])
    with pytest.raises(DataError, match=r"image 1: expected a grayscale"):
        preprocess_images(pre, [np.zeros((4, 4)), np.zeros((3, 4, 4))])
    for bad in (float("nan"), float("inf")):
        image = np.zeros((4, 4), np.float32)
        image[1, 2] = bad
        with pytest.raises(DataError, match="image 0: contains NaN or infinite"):
            preprocess_images(pre, [image])
    with pytest.raises(DataError, match=r"image 0: expected float pixel values.*uint8.*255"):
        preprocess_images(pre, [np.array([[0, 1], [1, 0]], np.uint8)])  # even all <= 1
    with pytest.raises(DataError, match=r"expected float pixel values.*int16"):
        preprocess_images(pre, [torch.zeros(4, 4, dtype=torch.int16)])
    with pytest.raises(DataError, match=r"image 1: is empty"):
        preprocess_images(pre, [np.zeros((4, 4), np.float32), np.zeros((0, 4), np.float32)])
    with pytest.raises(DataError, match=r"must lie in \[0, 1\], got \[0, 255\]"):
        preprocess_images(pre, [np.array([[0, 255], [17, 3]], np.float32)])
    with pytest.raises(DataError, match="must lie in"):
        preprocess_images(pre, [np.full((4, 4), -0.5, np.float32)])
