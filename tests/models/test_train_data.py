"""Training data: batched augmentation and normalisation against Preprocess, seeded draws,
the uint8 cache and seeded batch order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import CsvImageDataset
from models.train_data import (
    ImageSource,
    augment_batch,
    base_preprocess,
    draw_augmentation,
    normalise_batch,
)
from models.transforms import Preprocess, PreprocessConfig
from tests.models.train_fixtures import make_setup

NAMES = ["Consolidation", "Effusion"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CsvImageDataset:
    setup = make_setup(tmp_path_factory.mktemp("data"), n=9)
    return CsvImageDataset(
        setup["labels"], setup["images"], NAMES, transform=base_preprocess(PreprocessConfig(32))
    )


def test_identity_parameters_change_nothing() -> None:
    x = torch.rand(3, 1, 16, 16)
    params = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]).repeat(3, 1)
    assert torch.allclose(augment_batch(x, params), x, atol=1e-5)


def test_shift_moves_content_by_whole_pixels() -> None:
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 4] = 1.0
    params = torch.tensor([[0.0, 3.0, -2.0, 1.0, 1.0, 0.0]])  # 3 px right, 2 px up
    y = augment_batch(x, params)
    assert y[0, 0, 6, 7] == pytest.approx(1.0, abs=1e-5)
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["image", "fixed", "none"])
def test_normalise_batch_matches_preprocess(mode: str) -> None:
    cfg = PreprocessConfig(image_size=16, normalize=mode)
    x = torch.rand(4, 1, 16, 16)
    want = torch.stack([Preprocess(cfg).normalise(x[i]) for i in range(4)])
    assert torch.allclose(normalise_batch(x, cfg), want, atol=1e-5)


def test_draws_are_seeded_per_sample_and_epoch(dataset: CsvImageDataset) -> None:
    cfg = PreprocessConfig(image_size=32)
    idx = torch.tensor([0, 3, 5])
    a = draw_augmentation(dataset, idx, cfg)
    assert torch.equal(a, draw_augmentation(dataset, idx, cfg))
    assert torch.equal(a[1], draw_augmentation(dataset, torch.tensor([3]), cfg)[0])
    assert a[:, 0].abs().max() <= np.deg2rad(cfg.rotate_deg) + 1e-6
    assert (a[:, 3] - 1).abs().max() <= cfg.scale + 1e-6
    dataset.set_epoch(1)
    try:
        assert not torch.equal(a, draw_augmentation(dataset, idx, cfg))
    finally:
        dataset.set_epoch(0)


def test_cache_holds_the_letterboxed_images(dataset: CsvImageDataset) -> None:
    cached = ImageSource(dataset, cache=True)
    assert cached.images is not None and cached.images.dtype == torch.uint8
    assert cached.images.shape == (9, 32, 32)
    plain = ImageSource(dataset)
    a = next(cached.batches(4))
    b = next(plain.batches(4))
    assert torch.allclose(a.images, b.images, atol=0.5 / 255 + 1e-6)  # uint8 rounding only
    assert torch.equal(a.labels, b.labels) and torch.equal(a.indices, b.indices)


def test_batch_order_is_a_function_of_seed_and_epoch(dataset: CsvImageDataset) -> None:
    src = ImageSource(dataset, cache=True)

    def order(seed: int, epoch: int) -> list[int]:
        return [
            i
            for b in src.batches(4, shuffle=True, seed=seed, epoch=epoch)
            for i in b.indices.tolist()
        ]

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(9))
    assert order(0, 0) != order(0, 1)
    dropped = [len(b.indices) for b in src.batches(4, shuffle=True, drop_last=True)]
    assert dropped == [4, 4] and src.num_batches(4, drop_last=True) == 2
    uncached = ImageSource(dataset)
    assert [b.indices.tolist() for b in uncached.batches(4, shuffle=True, seed=0, epoch=0)] == [
        b.indices.tolist() for b in src.batches(4, shuffle=True, seed=0, epoch=0)
    ]


def test_cached_slot_of_a_broken_file_follows_its_replacement(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    setup = make_setup(tmp_path_factory.mktemp("broken"), n=9)
    ds = CsvImageDataset(
        setup["labels"], setup["images"], NAMES, transform=base_preprocess(PreprocessConfig(32))
    )
    Path(ds.paths[0]).write_bytes(b"truncated")  # breaks after the dataset was built
    labels_before = ds.labels.copy()
    cached = next(ImageSource(ds, cache=True).batches(9))
    uncached = next(ImageSource(ds).batches(9))
    assert cached.indices.tolist() == [1, *range(1, 9)]  # slot 0 holds image 1
    assert torch.equal(cached.indices, uncached.indices)
    assert torch.equal(cached.labels, uncached.labels) and torch.equal(cached.mask, uncached.mask)
    assert torch.allclose(cached.images, uncached.images, atol=0.5 / 255 + 1e-6)
    assert np.array_equal(ds.labels, labels_before)  # the dataset's own rows stay as they were
