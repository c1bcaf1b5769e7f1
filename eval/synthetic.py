"""Synthetic sets unlike the shared four, written as ann-benchmarks HDF5 files for ``eval.runner``.

The shared sets are what the defaults were measured on; these check the same public API on
data of other shapes, with exact ground truth (``faiss.knn``, top 100):

* ``deep96-synth``: 100K unit rows, 96-d, around 500 centres (Deep1B-like, L2);
* ``topics256-synth``: 80K rows, 256-d, sparse mixtures of 200 topics plus noise, angular
  (a text-embedding-like set with weak cluster structure);
* ``dups48-synth``: 70K rows, 48-d, independent gamma features on a raw scale (values in the
  thousands) with 30% exact duplicates: no cluster structure at all;
* ``gist960-synth``: 60K non-negative rows, 960-d, 300 tight centres and 32 shared directions
  (GIST-like, L2).

Each set keeps its last 1,000 rows as test queries (no learn queries). Then, per set:
``python -m flashgmm_ivf.eval.runner --dataset NAME --data-dir DIR --out eval/results --prefix synth``.

Run: ``python -m flashgmm_ivf.eval.synthetic --out DIR``
"""
from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np

from flashgmm_ivf.datasets.hdf5 import write_ann_hdf5

QUERIES = 1000
K = 100


def deep96(rng):
    centres = rng.normal(size=(500, 96)).astype(np.float32)
    x = centres[rng.integers(0, 500, 101_000)] + 0.7 * rng.normal(size=(101_000, 96)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), "euclidean"


def topics256(rng):
    topics = rng.normal(size=(200, 256)).astype(np.float32)
    mix = rng.dirichlet(np.full(200, 0.05), size=81_000).astype(np.float32)
    return mix @ topics + 0.3 * rng.normal(size=(81_000, 256)).astype(np.float32), "angular"


def dups48(rng):
    rows = rng.gamma(1.5, 800.0, size=(50_000, 48)).astype(np.float32)
    x = np.concatenate([rows, rows[rng.integers(0, 50_000, 21_000)]])
    rng.shuffle(x)
    return x, "euclidean"


def gist960(rng):
    d = 960
    centres = rng.gamma(2.0, 0.05, size=(300, d)).astype(np.float32)
    basis = rng.normal(size=(32, d)).astype(np.float32) * 0.02
    x = centres[rng.integers(0, 300, 61_000)] + rng.normal(size=(61_000, 32)).astype(np.float32) @ basis
    return np.abs(x + 0.01 * rng.normal(size=(61_000, d)).astype(np.float32)), "euclidean"


SETS = {"deep96-synth": deep96, "topics256-synth": topics256, "dups48-synth": dups48, "gist960-synth": gist960}


def write_set(name: str, out: Path, seed: int = 7) -> Path:
    """Generate one set (seeded) and write ``out/NAME.hdf5``; returns its path."""
    x, distance = SETS[name](np.random.default_rng(seed))
    x = np.ascontiguousarray(x, dtype=np.float32)
    base, test = x[:-QUERIES], x[-QUERIES:]
    if distance == "angular":
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        dist, ids = faiss.knn(unit(test), unit(base), K)
    else:
        dist, ids = faiss.knn(test, base, K)
    path = out / f"{name}.hdf5"
    write_ann_hdf5(path, train=base, test=test, neighbors=ids, distances=dist, distance=distance)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the HDF5 files (not the repository)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sets.split(","):
        print(write_set(name, out, args.seed))


if __name__ == "__main__":
    main()
