"""Generate a large, valid OBO ontology for load benchmarks (e.g. 300k concepts, 1M edges).

The ``is_a`` hierarchy is acyclic by construction (every ``is_a`` points at an earlier
concept); other relations (``part_of``, ``located_in``, ``suggests``, ``co_occurs_with``)
point anywhere and some carry ``{weight="..."}`` qualifiers. Output is deterministic for a
seed.

Usage: python bench/generate_ontology.py OUT.obo [--concepts 300000] [--edges 1000000]
       [--seed 0] [--load]
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

WORDS = (
    "abnormal",
    "opacity",
    "lung",
    "nodule",
    "effusion",
    "pleural",
    "cardiac",
    "enlarged",
    "consolidation",
    "mass",
    "lesion",
    "fracture",
    "rib",
    "density",
    "atelectasis",
    "edema",
    "pulmonary",
    "vascular",
    "hilar",
    "apical",
    "basal",
    "left",
    "right",
    "upper",
    "lower",
    "lobe",
    "segment",
    "diffuse",
    "focal",
    "chronic",
    "acute",
)
OTHER_RELATIONS = ("part_of", "located_in", "suggests", "co_occurs_with")


def generate_obo(path: str | Path, n_concepts: int, n_edges: int, seed: int = 0) -> Path:
    """Write an OBO file with ``n_concepts`` terms and exactly ``n_edges`` relations.

    Args:
        path: output file.
        n_concepts: number of ``[Term]`` stanzas (at least 1).
        n_edges: number of ``is_a`` + ``relationship`` lines; at least ``n_concepts - 1``
            (every concept but the root has one ``is_a``).
        seed: random seed; the same arguments give the same file.
    """
    if n_concepts < 1:
        raise ValueError(f"n_concepts must be >= 1, got {n_concepts}")
    if n_edges < n_concepts - 1:
        raise ValueError(f"n_edges must be >= n_concepts - 1 = {n_concepts - 1}, got {n_edges}")
    rng = random.Random(seed)
    extra = [0] * n_concepts
    if n_concepts > 1:
        for _ in range(n_edges - (n_concepts - 1)):
            extra[rng.randrange(1, n_concepts)] += 1
    path = Path(path)
    width = max(7, len(str(n_concepts)))
    with path.open("w", encoding="utf-8") as f:
        f.write(f"format-version: 1.4\ndata-version: generated/{seed}\n")
        f.write(f"ontology: {path.stem}\n")
        for i in range(n_concepts):
            words = rng.sample(WORDS, 3)
            label = f"{words[0].capitalize()} {words[1]} {words[2]} {i}"
            lines = [
                "",
                "[Term]",
                f"id: GEN:{i:0{width}d}",
                f"name: {label}",
                f'def: "A generated concept about \\"{words[0]}\\" number {i}." [GEN:curator]',
                f'synonym: "{words[2]} {words[1]} {i}" EXACT []',
                f"xref: UMLS:C{i:07d}",
            ]
            if i > 0:
                lines.append(f"is_a: GEN:{rng.randrange(i):0{width}d} ! parent")
            for _ in range(extra[i]):
                if rng.random() < 0.3:
                    lines.append(f"is_a: GEN:{rng.randrange(i):0{width}d}")
                    continue
                rel = rng.choice(OTHER_RELATIONS)
                target = f"GEN:{rng.randrange(n_concepts):0{width}d}"
                if rng.random() < 0.5:
                    weight = round(rng.uniform(0.01, 1.0), 3)
                    lines.append(f'relationship: {rel} {target} {{weight="{weight}"}} ! w')
                else:
                    lines.append(f"relationship: {rel} {target}")
            f.write("\n".join(lines))
            f.write("\n")
        for rel in OTHER_RELATIONS:
            f.write(f"\n[Typedef]\nid: {rel}\nname: {rel.replace('_', ' ')}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="OBO file to write.")
    parser.add_argument("--concepts", type=int, default=300_000)
    parser.add_argument("--edges", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--load", action="store_true", help="Then load it and print time and peak RSS."
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    generate_obo(args.out, args.concepts, args.edges, args.seed)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    if args.load:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from kg.loaders import load_ontology

        t0 = time.perf_counter()
        onto = load_ontology(args.out)
        elapsed = time.perf_counter() - t0
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"loaded {len(onto.concepts)} concepts, {len(onto.relations)} relations "
            f"in {elapsed:.2f} s; peak RSS {rss_mb:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
