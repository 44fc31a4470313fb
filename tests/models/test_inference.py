"""Predictor: checkpoint round trip, ontology refusal, stages, zero-shot, token reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kg.ontology import Concept, Ontology
from kg.tensors import GraphArrays
from models import default_checkpoint
from models.checkpoint import INFO_FILE
from models.errors import CheckpointError, DataError, ModelError, UnknownConceptError
from models.inference import (
    Predictor,
    label_names_for,
    pick_device,
    preprocess_config_for,
    reuse_image_tokens,
    stored_thresholds,
    weights_digest,
    zero_shot_scores,
)
from models.transforms import Preprocess
from tests.models.conftest import TARGETS, tiny_config
from tests.models.tiny_checkpoint import NAMES, save_tiny, store_ontology, tiny_model


@pytest.fixture
def stored(ontology: Ontology, features: torch.Tensor, tmp_home: Path) -> str:
    return store_ontology(ontology, features, tmp_home)


@pytest.fixture
def checkpoint(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, stored: str
) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(arrays, features)
    return save_tiny(tmp_path / "ckpt", model, stored), model


def _images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    sizes = [(32, 32), (20, 40), (64, 48)]
    return [rng.random(sizes[i % 3], dtype=np.float32) for i in range(n)]


def test_round_trip_from_checkpoint(checkpoint: tuple[Path, torch.nn.Module], stored: str) -> None:
    directory, model = checkpoint
    predictor = Predictor.load(directory, device="cpu")
    assert predictor.ontology_name == "tiny" and predictor.ontology_version == stored
    assert predictor.names == NAMES and predictor.targets == TARGETS
    assert predictor.model_version == f"ckpt-{weights_digest(directory)}"
    assert not predictor.model.training and predictor.model._entity_cache is not None
    assert predictor.thresholds is None and predictor.image_size == 32
    described = predictor.describe()
    assert described["ontology"] == {"name": "tiny", "version": stored}
    assert described["model"]["findings"]["Effusion"] == "X:effusion"
    json.dumps(described)

    batch, _ = predictor.preprocess(_images())
    out = predictor.predict(batch)
    assert out.probabilities.shape == (3, 3) and out.probabilities.dtype == torch.float32
    assert out.probabilities.device.type == "cpu"
    with torch.no_grad():
        expected = model(batch).probabilities
    torch.testing.assert_close(out.probabilities, expected)
    # the checkpoint json may also be named directly
    assert Predictor.load(directory / INFO_FILE, device="cpu").names == NAMES


def test_preprocess_stage(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    predictor = Predictor.load(checkpoint[0], device="cpu")
    images = _images()
    batch, geometries = predictor.preprocess(images)
    assert batch.shape == (3, 1, 32, 32) and batch.dtype == torch.float32
    reference = Preprocess(32)
    for image, x, geo in zip(images, batch, geometries, strict=True):
        ref, ref_geo = reference.with_geometry(image)
        torch.testing.assert_close(x, ref)
        assert geo == ref_geo
    assert (geometries[1].orig_height, geometries[1].orig_width) == (20, 40)
    assert geometries[1].pad_top == 8 and geometries[1].pad_left == 0
    # tensors work too
    batch2, _ = predictor.preprocess([torch.from_numpy(images[0])])
    torch.testing.assert_close(batch2[0], batch[0])


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([], "no images"),
        ([np.zeros((8, 8, 3), dtype=np.float32)], "grayscale"),
        ([np.full((8, 8), np.nan, dtype=np.float32)], "NaN"),
    ],
)
def test_preprocess_refuses_bad_images(
    checkpoint: tuple[Path, torch.nn.Module], images: list[np.ndarray], message: str
) -> None:
    predictor = Predictor.load(checkpoint[0], device="cpu")
    with pytest.raises(DataError, match=message):
        predictor.preprocess(images)


def test_predict_checks_inputs(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    predictor = Predictor.load(checkpoint[0], device="cpu")
    with pytest.raises(DataError, match=r"\(B, 1, 32, 32\)"):
        predictor.predict(torch.zeros(2, 1, 16, 16))
    batch, _ = predictor.preprocess(_images(2))
    with pytest.raises(DataError, match="texts has 1 entries for 2 images"):
        predictor.predict(batch, texts=["cough"])
    # blank texts mean no text: same as no texts at all
    torch.testing.assert_close(
        predictor.predict(batch, texts=[None, "  "]).logits, predictor.predict(batch).logits
    )
    # this tiny model's text_dim (24) does not fit the text encoder (MiniLM, 384)
    with pytest.raises(ModelError, match="text_dim=24"):
        predictor.predict(batch, texts=["fever", None])


def test_run_composes_the_stages(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    predictor = Predictor.load(checkpoint[0], device="cpu")
    images = _images(2)
    explained = predictor.run(images, top_k=2, image_ids=["a", "b"])
    batch, geometries = predictor.preprocess(images)
    out = predictor.predict(batch)
    assert [e.image_id for e in explained] == ["a", "b"]
    assert [f.name for f in explained[1].findings] == NAMES
    assert explained[1].findings[2].probability == pytest.approx(float(out.probabilities[1, 2]))
    assert explained[1].geometry == geometries[1]
    assert all(len(f.evidence) == 2 for f in explained[0].findings)
    json.dumps([e.to_dict() for e in explained])


def test_refuses_another_ontology_version(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, ontology: Ontology, stored: str
) -> None:
    model = tiny_model(arrays, features)
    directory = save_tiny(tmp_path / "other", model, "abcdef0123456789")
    # the exact version is neither stored nor bundled
    with pytest.raises(CheckpointError, match=r"tiny@abcdef0123456789.*allow_other_ontology"):
        Predictor.load(directory, device="cpu")
    # naming an ontology of another version: refused by the checkpoint's check
    with pytest.raises(CheckpointError, match="version abcdef0123456789"):
        Predictor.load(directory, ontology=ontology, device="cpu")
    # unless allowed: warns and serves, with the stored version of that name
    with pytest.warns(UserWarning, match="loading anyway"):
        predictor = Predictor.load(directory, device="cpu", allow_other_ontology=True)
    assert predictor.ontology_version == stored


def test_explicit_ontology_and_features(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, ontology: Ontology
) -> None:
    # no store at all: the Ontology object and the features are handed over
    model = tiny_model(arrays, features)
    directory = save_tiny(tmp_path / "c", model, ontology.content_hash())
    predictor = Predictor.load(directory, ontology=ontology, node_features=features, device="cpu")
    batch, _ = predictor.preprocess(_images(1))
    with torch.no_grad():
        torch.testing.assert_close(predictor.predict(batch).logits, model(batch).logits)


def test_unknown_ontology_spec(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(CheckpointError, match="cannot load ontology 'nope'"):
        Predictor.load(checkpoint[0], ontology="nope", device="cpu")


def test_missing_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_checkpoint, "default_checkpoint_dir", lambda: tmp_path / "none")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*none; train one with `kgdx"):
        Predictor.load()
    with pytest.raises(CheckpointError, match="not a folder"):
        Predictor.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"checkpoint\.json is missing"):
        Predictor.load(tmp_path / "empty")


def test_default_checkpoint_dir_is_package_data() -> None:
    path = default_checkpoint.default_checkpoint_dir()
    assert path.parts[-3:] == ("models", "data", "default")


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="device must be one of"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            pick_device("cuda")


def test_checkpoint_metadata_helpers() -> None:
    targets = ["X:a", "X:b"]
    assert label_names_for(targets, {"A": "X:a", "A2": "X:a"}) == ["A", "X:b"]
    info = {"metrics": {"val": {"thresholds": {"A": 0.3, "X:b": 0.7}}}}
    assert stored_thresholds(info, ["A", "B"], targets) == {"A": 0.3, "B": 0.7}
    assert stored_thresholds({"metrics": {"thresholds": {"A": 0.3}}}, ["A", "B"], targets) is None
    config = tiny_config()
    assert preprocess_config_for({}, config).image_size == 32
    pre = preprocess_config_for(
        {"extra": {"preprocess": {"image_size": 32, "resize": "stretch"}}}, config
    )
    assert pre.resize == "stretch"
    with pytest.raises(CheckpointError, match="bad preprocess"):
        preprocess_config_for({"extra": {"preprocess": {"size": 3}}}, config)


def test_stored_thresholds_reach_explanations(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, stored: str
) -> None:
    model = tiny_model(arrays, features)
    thresholds = {"Consolidation": 0.2, "Effusion": 0.5, "Opacity": 0.9}
    directory = save_tiny(
        tmp_path / "t", model, stored, extra={"metrics": {"thresholds": thresholds}}
    )
    predictor = Predictor.load(directory, device="cpu")
    assert predictor.thresholds == thresholds
    finding = predictor.run(_images(1))[0].finding("Opacity")
    assert finding.threshold == 0.9 and finding.positive == (finding.probability >= 0.9)


def test_zero_shot_scores(checkpoint: tuple[Path, torch.nn.Module], arrays: GraphArrays) -> None:
    predictor = Predictor.load(checkpoint[0], device="cpu")
    images = _images(2)
    batch, _ = predictor.preprocess(images)
    scores = zero_shot_scores(predictor, batch, ["X:pneumonia", "X:effusion"])
    assert scores.shape == (2, 2) and scores.dtype == np.float32
    assert ((scores > 0) & (scores < 1)).all()
    # a trained target scored "zero-shot" is its ordinary prediction
    np.testing.assert_allclose(
        scores[:, 1], predictor.predict(batch).probabilities[:, 1], atol=1e-6
    )
    # the zero-shot concept asked together with the targets
    model = predictor.model
    nodes = [*model.target_nodes.tolist(), model.concept_indices(["X:pneumonia"])[0]]
    with torch.no_grad():
        expected = model.score_concepts(batch, nodes).probabilities[:, -1]
    np.testing.assert_allclose(scores[:, 0], expected.numpy(), atol=1e-6)
    # alone, without the targets; decoded images are accepted too
    alone = zero_shot_scores(predictor, images, ["X:pneumonia"], with_targets=False)
    with torch.no_grad():
        single = model.score_concepts(batch, model.concept_indices(["X:pneumonia"]))
    np.testing.assert_allclose(alone[:, 0], single.probabilities[:, 0].numpy(), atol=1e-6)
    with pytest.raises(UnknownConceptError, match="X:nothing"):
        zero_shot_scores(predictor, batch, ["X:nothing"])


def test_zero_shot_refuses_the_ablation(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, stored: str
) -> None:
    model = tiny_model(arrays, features, use_kg=False)
    predictor = Predictor.load(save_tiny(tmp_path / "nokg", model, stored), device="cpu")
    assert predictor.model.gnn is None
    batch, _ = predictor.preprocess(_images(1))
    assert predictor.predict(batch).entity_relevance.shape == (1, 3, 3)
    with pytest.raises(ModelError, match="--no-kg"):
        zero_shot_scores(predictor, batch, ["X:pneumonia"])


def test_reuse_image_tokens_matches_plain_forwards(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = tiny_model(arrays, features)
    encoder = model.image_encoder
    calls: list[int] = []
    encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = torch.randn(3, 1, 32, 32)
    mask = torch.zeros(4, arrays.num_nodes, dtype=torch.bool)
    mask[1, 2] = mask[3, :4] = True
    with torch.no_grad():
        plain = model(images[[0, 0, 2, 1]], entity_mask=mask).logits
        calls.clear()
        with reuse_image_tokens(model, images) as rows:
            reused = model(rows([0, 0, 2, 1]), entity_mask=mask).logits
            full = model(rows(None)).logits
            other = model(torch.randn(1, 1, 32, 32))  # not registered: runs the encoder
    assert calls == [3, 1]
    assert model.image_encoder is encoder
    torch.testing.assert_close(reused, plain)
    torch.testing.assert_close(full, model(images).logits)
    assert other.logits.shape == (1, 3)


def test_ontology_without_the_targets_is_refused(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, stored: str
) -> None:
    model = tiny_model(arrays, features)
    directory = save_tiny(tmp_path / "c", model, stored)
    other = Ontology(name="other")
    other.add(Concept(id="Y:1", label="One"))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="X:consolidation"):
        Predictor.load(
            directory,
            ontology=other,
            allow_other_ontology=True,
            node_features=torch.zeros(1, features.shape[1]),
            device="cpu",
        )


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--random-init", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("note: CUDA is not available") or torch.cuda.is_available()
    result = json.loads(lines[-1])
    assert [r["batch_size"] for r in result["results"]] == [1, 8]
    assert all(r["images_per_s"] > 0 for r in result["results"])


def test_deletion_test_on_predicted_positives(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    from models.faithfulness import DeletionConfig, positive_pairs

    predictor = Predictor.load(checkpoint[0], device="cpu")
    batch, _ = predictor.preprocess(_images(3))
    out = predictor.predict(batch)
    records = predictor.deletion_test(batch, out, config=DeletionConfig(k=2, random_draws=2))
    assert [(r.image, r.finding) for r in records] == positive_pairs(out.probabilities)
    one = predictor.deletion_test(batch, out, [(1, 0)], DeletionConfig(k=1, random_draws=1))
    assert len(one) == 1 and len(one[0].evidence) == 1


def test_predict_ranks_evidence_by_attribution_unless_told_otherwise(
    checkpoint: tuple[Path, torch.nn.Module],
    tmp_path: Path,
    arrays: GraphArrays,
    features: torch.Tensor,
    stored: str,
) -> None:
    """By default the output carries the attribution and its shares; ``evidence =
    "attention"`` gives the plain forward; the scores are the same either way; a masked
    forward and the --no-kg ablation rank by attention."""
    directory, _ = checkpoint
    predictor = Predictor.load(directory, device="cpu")
    assert predictor.evidence == "attribution"
    batch, _ = predictor.preprocess(_images())
    attributed = predictor.predict(batch)
    assert attributed.entity_attribution is not None
    assert attributed.entity_attribution.shape == (3, 3, arrays.num_nodes)
    assert not attributed.entity_relevance.requires_grad
    predictor.evidence = "attention"
    plain = predictor.predict(batch)
    assert plain.entity_attribution is None
    torch.testing.assert_close(plain.probabilities, attributed.probabilities)
    assert not torch.allclose(plain.entity_relevance, attributed.entity_relevance)
    predictor.evidence = "attribution"
    masked = predictor.predict(batch, entity_mask=torch.zeros(arrays.num_nodes, dtype=torch.bool))
    assert masked.entity_attribution is None
    assert predictor.predict(batch, evidence="attention").entity_attribution is None
    predictor.evidence = "saliency"
    with pytest.raises(ModelError, match="evidence must be one of"):
        predictor.predict(batch)
    assert predictor.predict(batch, evidence="attribution").entity_attribution is not None
    nokg = tiny_model(arrays, features, use_kg=False)
    ablation = Predictor.load(save_tiny(tmp_path / "nokg", nokg, stored), device="cpu")
    assert ablation.predict(batch).entity_attribution is None
