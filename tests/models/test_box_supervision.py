"""Box supervision: training boxes -> target cells (through letterbox and augmentation), the
loss, and both trainers with ``train.box_weight``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.baseline import train_baseline
from models.box_supervision import BoxTargets, box_attention_loss, box_targets_for
from models.data import CsvImageDataset
from models.errors import DataError
from models.localisation import Box
from models.train_data import base_preprocess, warp_batch
from models.trainer import train_model
from models.transforms import PreprocessConfig
from tests.models.train_fixtures import (
    FakeEncoder,
    make_images,
    make_setup,
    tiny_training_config,
    write_csv,
)

BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h]\n"


def targets(
    boxes: list[tuple[int, tuple[float, float, float, float]]], size: int = 32
) -> BoxTargets:
    return BoxTargets([[(k, Box(*b)) for k, b in boxes]], size)


def cells(t: torch.Tensor, k: int = 0) -> set[int]:
    return {int(c) for c in torch.nonzero(t[0, k]).flatten()}


def test_cells_whose_centres_lie_in_the_box() -> None:
    # 32 px, 4 x 4 grid: centres at 4, 12, 20, 28; the box spans x 0-16, y 0-16
    target, has = targets([(1, (0.0, 0.0, 16.0, 16.0))]).cell_targets(torch.tensor([0]), 3, (4, 4))
    assert has.tolist() == [[False, True, False]]
    assert cells(target, 1) == {0, 1, 4, 5}
    assert not target[0, 0].any() and not target[0, 2].any()


def test_a_box_without_a_cell_centre_targets_the_cell_it_covers_most() -> None:
    target, has = targets([(0, (17.0, 25.0, 2.0, 2.0))]).cell_targets(torch.tensor([0]), 1, (4, 4))
    assert has.tolist() == [[True]]
    assert cells(target) == {3 * 4 + 2}  # row 3, column 2


def test_several_boxes_of_one_finding_are_one_target() -> None:
    boxes = [(0, (0.0, 0.0, 8.0, 8.0)), (0, (24.0, 24.0, 8.0, 8.0))]
    target, has = targets(boxes).cell_targets(torch.tensor([0]), 1, (4, 4))
    assert int(has.sum()) == 1 and cells(target) == {0, 15}


def test_boxes_follow_the_augmentation() -> None:
    # a 90 degree turn moves the top-left quadrant; the cells must move with the image
    angle = math.pi / 2
    params = torch.tensor([[angle, 0.0, 0.0, 1.0, 1.0, 0.0]])
    t = targets([(0, (0.0, 0.0, 16.0, 16.0))])
    target, _ = t.cell_targets(torch.tensor([0]), 1, (4, 4), params)
    image = torch.zeros(1, 1, 32, 32)
    image[..., :16, :16] = 1.0
    moved = warp_batch(image, params, mode="nearest")[0, 0]
    centres = [(int((r + 0.5) * 8), int((c + 0.5) * 8)) for r in range(4) for c in range(4)]
    assert cells(target) == {i for i, (y, x) in enumerate(centres) if moved[y, x] > 0.5}
    assert cells(target) != {0, 1, 4, 5}


def test_a_box_shifted_out_of_view_is_not_a_target() -> None:
    params = torch.tensor([[0.0, 40.0, 0.0, 1.0, 1.0, 0.0]])  # shift right by more than 32 px
    target, has = targets([(0, (20.0, 0.0, 12.0, 12.0))]).cell_targets(
        torch.tensor([0]), 1, (4, 4), params
    )
    assert not has.any() and not target.any()


def test_loss_is_minus_log_mass_on_the_target() -> None:
    attention = torch.full((1, 2, 4), 0.25, requires_grad=True)
    target = torch.tensor([[[True, True, False, False], [False, False, False, False]]])
    has = torch.tensor([[True, False]])
    loss = box_attention_loss(attention, target, has)
    assert float(loss.detach()) == pytest.approx(-math.log(0.5))
    loss.backward()
    assert attention.grad is not None and attention.grad[0, 1].abs().sum() == 0
    none = box_attention_loss(attention, target, torch.zeros_like(has))
    assert float(none.detach()) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="do not match"):
        box_attention_loss(attention, target[..., :3], has)


def test_minimising_the_loss_moves_the_peak_into_the_box() -> None:
    scores = torch.zeros(1, 1, 16, requires_grad=True)
    scores.data[0, 0, 15] = 2.0  # the map starts on the bottom-right corner
    target, has = targets([(0, (0.0, 0.0, 16.0, 16.0))]).cell_targets(torch.tensor([0]), 1, (4, 4))
    optimiser = torch.optim.SGD([scores], lr=1.0)
    for _ in range(50):
        optimiser.zero_grad()
        box_attention_loss(torch.softmax(scores, -1), target, has).backward()
        optimiser.step()
    assert int(scores[0, 0].argmax()) in {0, 1, 4, 5}


# -- from a labels CSV and a box file --------------------------------------------------------


def nih_setup(root: Path) -> dict[str, Any]:
    """The tiny training set-up with NIH-style names (``nih_<Image Index>``) and a box file
    holding each Consolidation blob (rows 10-30, columns 4-16 of a 40 px image)."""
    setup: dict[str, Any] = dict(make_setup(root))
    rows = make_images(setup["images"], n=24)
    for r in rows:
        old = setup["images"] / r["image"]
        r["image"] = f"nih_{r['image']}"
        old.rename(setup["images"] / r["image"])
    rows[0]["Consolidation"] = "0"  # a known negative that keeps a box: skipped
    rows[0]["labeled_findings"] = "ALL"
    write_csv(setup["labels"], rows)
    scale = 1024 / 40
    lines = [
        f"{r['image'][4:]},Consolidation,{4 * scale},{10 * scale},{12 * scale},{20 * scale}"
        for r in rows
        if r["Consolidation"] == "1" or r is rows[0]
    ]
    lines.append(f"{rows[1]['image'][4:]},Mass,0,0,100,100")  # not a training label
    setup["boxes"] = root / "boxes.csv"
    setup["boxes"].write_text(BOX_HEADER + "\n".join(lines) + "\n")
    setup["positives"] = sum(r["Consolidation"] == "1" for r in rows)
    return setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return nih_setup(tmp_path_factory.mktemp("boxes"))


def test_box_targets_from_the_box_file(setup: dict[str, Any]) -> None:
    ds = CsvImageDataset(setup["labels"], setup["images"], ["Consolidation", "Effusion"])
    pre = base_preprocess(PreprocessConfig(image_size=32))
    bt = box_targets_for(ds, setup["boxes"], pre)
    assert bt.n_boxes == setup["positives"] and bt.skipped_negative == 1
    assert bt.n_images == setup["positives"]
    i = next(i for i, b in enumerate(bt.boxes) if b)
    (column, box), *_ = bt.boxes[i]
    assert column == 0  # Consolidation
    # no h / w columns: the image (40 x 40) was decoded for its size; 32 / 40 = 0.8
    np.testing.assert_allclose(box.as_tuple(), (3.2, 8.0, 9.6, 16.0), atol=1e-6)


def test_no_box_on_the_training_images(setup: dict[str, Any], tmp_path: Path) -> None:
    ds = CsvImageDataset(setup["labels"], setup["images"], ["Effusion"])
    with pytest.raises(DataError, match="no box of the findings Effusion falls on a training"):
        box_targets_for(ds, setup["boxes"], base_preprocess(PreprocessConfig(image_size=32)))
    bad = tmp_path / "bad.csv"
    bad.write_text("Image Index,Finding\nx.png,Mass\n")
    with pytest.raises(DataError, match="missing column"):
        box_targets_for(ds, bad, base_preprocess(PreprocessConfig(image_size=32)))


def overrides(setup: dict[str, Any], weight: float) -> list[str]:
    return [
        f"data.boxes={json.dumps(str(setup['boxes']))}",
        f"train.box_weight={weight}",
        "train.epochs=1",
    ]


def log_line(out: Path) -> dict[str, Any]:
    return json.loads((out / "train_log.jsonl").read_text().splitlines()[0])


def test_the_kgdx_trainer_adds_the_box_loss(setup: dict[str, Any], tmp_path: Path) -> None:
    cfg = tiny_training_config(setup, *overrides(setup, 1.0))
    result = train_model(
        cfg, tmp_path / "kg", encoder=FakeEncoder(), progress=False, echo=lambda _: None
    )
    line = log_line(result.out_dir)
    assert line["train_box"] > 0
    assert line["train_loss"] > line["train_bce"]


def test_the_plain_classifier_supervises_its_cams(setup: dict[str, Any], tmp_path: Path) -> None:
    cfg = tiny_training_config(setup, *overrides(setup, 1.0))
    with_boxes = train_baseline(cfg, tmp_path / "cam", progress=False, echo=lambda _: None)
    cfg0 = tiny_training_config(setup, *overrides(setup, 0.0))
    without = train_baseline(cfg0, tmp_path / "plain", progress=False, echo=lambda _: None)
    a = json.loads((with_boxes.out_dir / "train_log.jsonl").read_text().splitlines()[0])
    b = json.loads((without.out_dir / "train_log.jsonl").read_text().splitlines()[0])
    assert a["train_loss"] > b["train_loss"]  # same seed and data: the box term is added


@pytest.mark.parametrize(("x0", "hit"), [(12.0, True), (12.2, False)])
def test_a_centre_on_the_box_edge_counts_as_the_pointing_game_does(x0: float, hit: bool) -> None:
    box = (x0, 0.0, 20.0 - x0, 16.0)  # its left edge at or just right of the centre x = 12
    target, _ = targets([(0, box)]).cell_targets(torch.tensor([0]), 1, (4, 4))
    assert (1 in cells(target)) is hit  # cell (0, 1): centre (12, 4)
    assert Box(*box).contains(12.0, 4.0) is hit


def test_augmented_targets_agree_with_the_pointing_game_on_the_warped_image() -> None:
    # a shift by whole pixels moves the box exactly: the targets are the shifted box's cells
    params = torch.tensor([[0.0, 8.0, -4.0, 1.0, 1.0, 0.0]])  # 8 px right, 4 px up
    box = (4.0, 12.0, 8.0, 8.0)
    target, _ = targets([(0, box)]).cell_targets(torch.tensor([0]), 1, (4, 4), params)
    moved = Box(12.0, 8.0, 8.0, 8.0)
    want = {r * 4 + c for r in range(4) for c in range(4) if moved.contains(c * 8 + 4, r * 8 + 4)}
    assert cells(target) == want and want
