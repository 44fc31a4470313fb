"""Datasets: CSV + images (real radiographs from ../shared/data), npz, DICOM folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch.utils.data import DataLoader, Subset

from models.data import (
    CXR_LABELS,
    CsvImageDataset,
    DicomFolderDataset,
    NpzDataset,
    labels_summary,
    load_image,
    pil_to_array,
)
from models.errors import DataError
from models.transforms import Preprocess, PreprocessConfig

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CXR_IMAGES = DATA / "cxr" / "images"
NIH_256 = "nih_00000344_003.png"  # Atelectasis, Effusion, Infiltration; 256 x 256
NIH_64 = "nih_00000231_013.png"  # No finding; 64 x 64
KERMANY = "kermany_person1001_bacteria_2932.png"  # pediatric pneumonia; 256 x 178

needs_cxr = pytest.mark.skipif(
    not (CXR_IMAGES / NIH_256).is_file(), reason="../shared/data/cxr not available"
)

HEADER = ["image", "source", "patient_id", "view", *CXR_LABELS, "labeled_findings", "split"]


def _row(image: str, patient: str, split: str, positives=(), labeled="ALL", **extra) -> dict:
    row = {"image": image, "source": "test", "patient_id": patient, "view": "PA"}
    row.update({name: "1" if name in positives else "0" for name in CXR_LABELS})
    row.update(labeled_findings=labeled, split=split, **extra)
    return row


def _write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def cxr_csv(tmp_path: Path) -> Path:
    rows = [
        _row(NIH_256, "nih_344", "train", ("Atelectasis", "Effusion", "Infiltration")),
        _row(NIH_64, "nih_231", "train", ("No_Finding",)),
        _row(KERMANY, "kermany_person1001", "val", ("Pneumonia",), "Pneumonia;No_Finding"),
        _row("nih_99999999_000.png", "nih_99999999", "train", ("No_Finding",)),  # no file
    ]
    return _write_csv(tmp_path / "labels.csv", rows)


# ---------------------------------------------------------------------------------------------
# CSV + images
# ---------------------------------------------------------------------------------------------


@needs_cxr
def test_csv_dataset_labels_mask_meta_and_skipped(cxr_csv: Path) -> None:
    ds = CsvImageDataset(cxr_csv, CXR_IMAGES, list(CXR_LABELS))
    assert len(ds) == 3
    assert ds.n_skipped == 1 and ds.skipped[0] == ("nih_99999999_000.png", "missing file")
    k = {name: i for i, name in enumerate(CXR_LABELS)}

    image, labels, mask, meta = ds[0]
    assert image.shape == (1, 256, 256) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.std()) > 0.05
    assert labels.dtype == torch.float32 and labels.shape == (15,)
    assert labels[k["Effusion"]] == 1 and labels[k["Pneumonia"]] == 0
    assert mask.sum() == 15  # ALL labelled
    assert meta["id"] == NIH_256 and meta["patient"] == "nih_344"
    assert meta["path"].endswith(NIH_256) and (meta["height"], meta["width"]) == (256, 256)

    image, labels, mask, meta = ds[2]  # Kermany: only Pneumonia and No_Finding are known
    assert image.shape == (1, 178, 256)
    assert mask.sum() == 2 and mask[k["Pneumonia"]] == 1 and mask[k["No_Finding"]] == 1
    assert labels[k["Pneumonia"]] == 1 and labels.sum() == 1
    assert ds.rows[2]["patient_id"] == "kermany_person1001"


@needs_cxr
def test_csv_dataset_strict_names_the_missing_file(cxr_csv: Path) -> None:
    with pytest.raises(DataError, match=r"nih_99999999_000\.png \(missing file\)"):
        CsvImageDataset(cxr_csv, CXR_IMAGES, ["Pneumonia"], strict=True)


@needs_cxr
@pytest.mark.parametrize(
    ("split", "n"), [("train", 2), ("val", 1), (["train", "val"], 3), (None, 3)]
)
def test_csv_dataset_split(cxr_csv: Path, split, n: int) -> None:
    assert len(CsvImageDataset(cxr_csv, CXR_IMAGES, ["Pneumonia"], split=split)) == n


@needs_cxr
def test_csv_dataset_empty_split_is_an_error(cxr_csv: Path) -> None:
    with pytest.raises(DataError, match="no rows with split in \\['test'\\]"):
        CsvImageDataset(cxr_csv, CXR_IMAGES, ["Pneumonia"], split="test")


def test_missing_label_column_names_it_and_lists_columns(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "l.csv", [_row("a.png", "p", "train")])
    with pytest.raises(DataError) as info:
        CsvImageDataset(path, tmp_path, ["Pneumonia", "Covid", "Fracture"])
    message = str(info.value)
    assert "missing column(s) Covid, Fracture" in message
    assert "available columns: image, source, patient_id" in message


def test_split_without_split_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "l.csv", [{"image": "a.png", "Pneumonia": "1"}])
    with pytest.raises(DataError, match="missing column\\(s\\) split"):
        CsvImageDataset(path, tmp_path, ["Pneumonia"], split="train")


@pytest.mark.parametrize(
    ("path_kind", "match"), [("csv", "labels CSV not found"), ("dir", "images folder not found")]
)
def test_missing_csv_or_folder(tmp_path: Path, path_kind: str, match: str) -> None:
    csv_path = _write_csv(tmp_path / "l.csv", [{"image": "a.png", "Pneumonia": "1"}])
    if path_kind == "csv":
        csv_path = tmp_path / "nope.csv"
    folder = tmp_path / "nope" if path_kind == "dir" else tmp_path
    with pytest.raises(DataError, match=match):
        CsvImageDataset(csv_path, folder, ["Pneumonia"])


def _png(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    arr = np.full(size[::-1], value, dtype=np.uint8)
    arr[0, 0] = 0
    Image.fromarray(arr).save(path)
    return path


def test_unknown_values_are_masked_and_bad_values_rejected(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    rows = [
        {"image": "a.png", "Pneumonia": "1", "Edema": ""},
        {"image": "b.png", "Pneumonia": "-1", "Edema": "0.0"},
        {"image": "c.png", "Pneumonia": "0", "Edema": "1.0"},
    ]
    ds = CsvImageDataset(_write_csv(tmp_path / "l.csv", rows), tmp_path, ["Pneumonia", "Edema"])
    np.testing.assert_array_equal(ds.labels, [[1, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(ds.mask, [[1, 0], [0, 1], [1, 1]])
    assert ds.patients == ["a.png", "b.png", "c.png"]  # no patient_id column

    rows[1]["Edema"] = "maybe"
    with pytest.raises(DataError, match=r"line 3: column 'Edema' must be 0 or 1.*'maybe'"):
        CsvImageDataset(_write_csv(tmp_path / "l.csv", rows), tmp_path, ["Pneumonia", "Edema"])


def test_labeled_findings_with_unknown_column_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "Pneumonia": "1", "labeled_findings": "Pneumonia;Pnemonia"}]
    with pytest.raises(DataError, match="labeled_findings names column\\(s\\) not in the file"):
        CsvImageDataset(_write_csv(tmp_path / "l.csv", rows), tmp_path, ["Pneumonia"])


def test_report_column_reaches_meta(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    rows = [{"image": "a.png", "patient_id": "p1", "Pneumonia": "1", "report": "RLL opacity."}]
    ds = CsvImageDataset(_write_csv(tmp_path / "l.csv", rows), tmp_path, ["Pneumonia"])
    assert ds[0][3]["report"] == "RLL opacity."


@pytest.mark.parametrize("verify", ["header", "decode"])
def test_unreadable_image_is_skipped_up_front(tmp_path: Path, verify: str) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    rows = [{"image": "good.png", "Pneumonia": "1"}, {"image": "bad.png", "Pneumonia": "0"}]
    path = _write_csv(tmp_path / "l.csv", rows)
    ds = CsvImageDataset(path, tmp_path, ["Pneumonia"], verify=verify)
    assert len(ds) == 1 and ds.skipped[0][0] == "bad.png"
    assert ds.skipped[0][1].startswith("unreadable")
    with pytest.raises(DataError, match=r"1 image\(s\) missing or unreadable: bad\.png"):
        CsvImageDataset(path, tmp_path, ["Pneumonia"], verify=verify, strict=True)


def test_image_broken_after_construction_is_replaced_or_fatal(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 10)
    _png(tmp_path / "b.png", 200)
    rows = [{"image": "a.png", "Pneumonia": "1"}, {"image": "b.png", "Pneumonia": "0"}]
    path = _write_csv(tmp_path / "l.csv", rows)
    ds = CsvImageDataset(path, tmp_path, ["Pneumonia"])
    (tmp_path / "a.png").write_bytes(b"truncated")
    _, labels, _, meta = ds[0]
    assert meta["id"] == "b.png" and labels.tolist() == [0.0]  # the next sample
    assert ds.skipped[0][0] == "a.png"
    strict = CsvImageDataset(path, tmp_path, ["Pneumonia"], verify="none", strict=True)
    with pytest.raises(DataError, match=r"a\.png: unreadable at load time"):
        strict[0]


def test_all_images_missing_is_an_error(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "l.csv", [{"image": "x.png", "Pneumonia": "1"}])
    with pytest.raises(DataError, match="none of the 1 selected images could be used"):
        CsvImageDataset(path, tmp_path, ["Pneumonia"])


@pytest.mark.parametrize("bad", [[], ["A", "A"]])
def test_bad_label_names(tmp_path: Path, bad: list[str]) -> None:
    path = _write_csv(tmp_path / "l.csv", [{"image": "x.png", "A": "1"}])
    with pytest.raises(DataError, match="label_names"):
        CsvImageDataset(path, tmp_path, bad)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "make", "expected_max"),
    [
        ("L", lambda: np.array([[0, 255], [51, 102]], np.uint8), 1.0),
        ("RGB", lambda: np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8), 0.299),
        ("RGBA", lambda: np.array([[[0, 255, 0, 0], [0, 0, 0, 255]]], np.uint8), 0.587),
        ("I;16", lambda: np.array([[0, 4095], [1024, 2048]], np.uint16), 1.0),  # 12-bit data
        ("I;16", lambda: np.array([[0, 65535]], np.uint16), 1.0),
        ("I;16", lambda: np.array([[0, 200]], np.uint16), 200 / 255),  # at least 8 bits
    ],
)
def test_pil_to_array_modes(tmp_path: Path, mode: str, make, expected_max: float) -> None:
    arr = make()
    image = Image.fromarray(arr, mode=mode) if mode != "I;16" else Image.fromarray(arr)
    path = tmp_path / "x.png"
    image.save(path)
    out = load_image(path)
    assert out.dtype == np.float32 and out.shape == arr.shape[:2]
    assert out.min() >= 0 and out.max() == pytest.approx(expected_max, abs=2e-3)


def test_pil_to_array_palette_and_float() -> None:
    p = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    p.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    np.testing.assert_allclose(pil_to_array(p), [[0, 1]], atol=1e-6)
    f = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32), mode="F")
    np.testing.assert_allclose(pil_to_array(f), [[0, 0.5, 1]], atol=1e-6)


def test_load_image_rejects_garbage(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x00" * 300)
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------
# Transforms, batching, determinism
# ---------------------------------------------------------------------------------------------


@needs_cxr
def test_dataloader_batches_preprocessed_real_images(cxr_csv: Path) -> None:
    ds = CsvImageDataset(cxr_csv, CXR_IMAGES, list(CXR_LABELS), transform=Preprocess(64))
    images, labels, mask, meta = next(iter(DataLoader(ds, batch_size=3)))
    assert images.shape == (3, 1, 64, 64) and labels.shape == mask.shape == (3, 15)
    assert meta["id"] == [NIH_256, NIH_64, KERMANY]
    assert meta["height"].tolist() == [256, 64, 178]
    assert abs(float(images[0].mean())) < 1e-4  # per-image standardised


def test_training_augmentation_is_seeded_by_seed_epoch_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"image": f"{i}.png", "Pneumonia": str(i % 2)} for i in range(3)]
    path = _write_csv(tmp_path / "l.csv", rows)
    train = Preprocess(PreprocessConfig(image_size=32), train=True)

    def epoch_images(seed: int, epoch: int) -> torch.Tensor:
        ds = CsvImageDataset(path, tmp_path, ["Pneumonia"], transform=train, seed=seed)
        ds.set_epoch(epoch)
        return torch.stack([ds[i][0] for i in range(len(ds))])

    a = epoch_images(0, 0)
    assert torch.equal(a, epoch_images(0, 0))
    assert not torch.equal(a, epoch_images(0, 1))
    assert not torch.equal(a, epoch_images(1, 0))
    # worker processes see the same draws as the main process
    ds = CsvImageDataset(path, tmp_path, ["Pneumonia"], transform=train, seed=0)
    loaded = next(iter(DataLoader(ds, batch_size=3, num_workers=2)))[0]
    assert torch.equal(loaded, a)


def test_subset_keeps_rows_aligned(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png", 50 * i)
    rows = [{"image": f"{i}.png", "patient_id": f"p{i}", "Pneumonia": str(i % 2)} for i in range(4)]
    ds = CsvImageDataset(_write_csv(tmp_path / "l.csv", rows), tmp_path, ["Pneumonia"])
    sub = ds.subset([3, 0])
    assert len(sub) == 2 and sub.ids == ["3.png", "0.png"]
    assert sub.labels[:, 0].tolist() == [1, 0] and [r["patient_id"] for r in sub.rows] == [
        "p3",
        "p0",
    ]
    assert sub[0][3]["id"] == "3.png" and len(ds) == 4
    with pytest.raises(IndexError):
        ds.subset([4])


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------


def test_npz_dataset(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    np.savez(
        path,
        train_images=images.astype(np.uint8),
        train_labels=np.array([[1], [0], [1]], np.uint8),
        val_images=images[:1].astype(np.uint8),
        val_labels=np.array([[0]], np.uint8),
    )
    ds = NpzDataset(path, "train", ["Pneumonia"])
    image, labels, mask, meta = ds[2]
    assert image.shape == (1, 28, 28) and float(image.max()) <= 1.0
    assert torch.allclose(image[0], torch.from_numpy(images[2] / 255.0).float())
    assert labels.tolist() == [1.0] and mask.tolist() == [1.0]
    assert meta["id"] == "train_2" and meta["path"].endswith("::train_images[2]")
    assert len(NpzDataset(path, "val")) == 1
    with pytest.raises(DataError, match="available keys: train_images"):
        NpzDataset(path, "test")
    with pytest.raises(DataError, match="1 label column\\(s\\) but label_names has 2"):
        NpzDataset(path, "train", ["Pneumonia", "Normal"])


def test_npz_rejects_multiclass_labels(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0], [3]]))
    with pytest.raises(DataError, match="must be 0/1"):
        NpzDataset(path)


@pytest.mark.skipif(
    not (DATA / "medmnist" / "pneumoniamnist_subset.npz").is_file(), reason="no medmnist data"
)
def test_real_pneumoniamnist_subset() -> None:
    ds = NpzDataset(DATA / "medmnist" / "pneumoniamnist_subset.npz", "test")
    summary = labels_summary(ds)
    assert summary["n"] == 468 and summary["positives"]["Pneumonia"] == 234
    assert ds[0][0].shape == (1, 28, 28)


# ---------------------------------------------------------------------------------------------
# DICOM folder
# ---------------------------------------------------------------------------------------------


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str, patient: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, 12)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_folder_dataset(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 4095, 16).astype(np.uint16), (8, 1))
    _write_dicom(tmp_path / "a.dcm", ramp, "MONOCHROME2", "PAT-A")
    _write_dicom(tmp_path / "b", ramp, "MONOCHROME1", "PAT-B")  # no suffix
    (tmp_path / "c.dcm").write_bytes(b"not dicom")
    rows = [
        {"image": "a.dcm", "Effusion": "1"},
        {"image": "b", "Effusion": "0"},
        {"image": "c.dcm", "Effusion": "0"},
    ]
    ds = DicomFolderDataset(tmp_path, _write_csv(tmp_path / "l.csv", rows), ["Effusion"])
    assert len(ds) == 2 and ds.skipped[0][0] == "c.dcm"
    assert ds.patients == ["PAT-A", "PAT-B"]  # read from the headers
    a, b = ds[0][0], ds[1][0]
    assert a.shape == (1, 8, 16)
    assert float(a[0, 0, 0]) == 0.0 and float(a[0, 0, -1]) == 1.0
    assert torch.allclose(a, 1 - b)  # MONOCHROME1 inverted


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def test_labels_summary_counts(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    rows = [
        {"image": "a.png", "patient_id": "p", "source": "s1", "Pneumonia": "1", "Edema": ""},
        {"image": "b.png", "patient_id": "p", "source": "s1", "Pneumonia": "0", "Edema": "1"},
        {"image": "c.png", "patient_id": "q", "source": "s2", "Pneumonia": "1", "Edema": "0"},
    ]
    ds = CsvImageDataset(_write_csv(tmp_path / "l.csv", rows), tmp_path, ["Pneumonia", "Edema"])
    s = labels_summary(ds)
    assert s["n"] == 3 and s["patients"] == 2 and s["skipped"] == 0
    assert s["positives"] == {"Pneumonia": 2, "Edema": 1}
    assert s["negatives"] == {"Pneumonia": 1, "Edema": 1}
    assert s["unknown"] == {"Pneumonia": 0, "Edema": 1}
    assert s["sources"] == {"s1": 2, "s2": 1}
    sub = labels_summary(Subset(ds, [2]))
    assert sub["n"] == 1 and sub["positives"]["Pneumonia"] == 1 and sub["patients"] == 1


@needs_cxr
def test_real_labels_csv_summary() -> None:
    ds = CsvImageDataset(DATA / "cxr" / "labels.csv", CXR_IMAGES, list(CXR_LABELS), verify="exists")
    s = labels_summary(ds)
    assert s["n"] == 4644 and s["skipped"] == 0
    assert s["positives"]["Hernia"] == 64 and s["positives"]["Effusion"] == 918
    assert s["unknown"]["Atelectasis"] == 958 and s["unknown"]["Pneumonia"] == 0


def test_npz_colour_images_become_gray(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    rgb = np.zeros((1, 2, 2, 3), np.uint8)
    rgb[0, 0, 0] = (255, 255, 255)
    np.savez(path, train_images=rgb, train_labels=np.array([[1]], np.uint8))
    image = NpzDataset(path)[0][0]
    assert image.shape == (1, 2, 2) and float(image.max()) == pytest.approx(1.0)
