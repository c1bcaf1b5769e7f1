"""The small real set shipped in the wheel (``flashgmm_ivf/data``): 10,000 SIFT base rows and 1,000 queries."""
from __future__ import annotations

import json
from importlib import resources

import numpy as np

__all__ = ["BUNDLED", "bundled_dataset"]

BUNDLED = "sift-photos-128"


def bundled_dataset():
    """The bundled sample.

    Returns
    -------
    base : ndarray of shape (10000, 128), uint8
    test : ndarray of shape (1000, 128), uint8
    meta : dict
        Provenance (``name``, sources, how the rows were drawn).
    """
    folder = resources.files("flashgmm_ivf") / "data"
    with resources.as_file(folder) as path:
        base = np.load(path / f"{BUNDLED}-base10k.npy", allow_pickle=False)
        test = np.load(path / f"{BUNDLED}-test1k.npy", allow_pickle=False)
        meta = json.loads((path / f"{BUNDLED}.json").read_text())
    return base, test, meta
