"""Named benchmark sets, resolved to files under a data directory.

Search order for every name: the data directory (``data_dir`` argument, else
``$FLASHGMM_DATA``, else ``~/.cache/flashgmm-ivf/data``), then the repository's shared
folder ``<repo>/../shared/data``.  Layouts, relative to either:

* ``NAME/{base,test,learn,gt}.npy`` + ``meta.json`` for the project's own sets
  (``fashion-mnist-784``, ``mnist-784``, ``glove-6B-50d``, ``sift-photos-128`` and each
  ``NAME-small``), built by ``../shared/data/fetch``;
* ``sift/sift_*.fvecs`` + ``sift_groundtruth.ivecs`` (``sift1m``), likewise ``gist/``
  (``gist1m``): the texmex tarballs, extracted;
* ``deep1b/*.fbin`` and ``bigann/*.u8bin`` (big-ann-benchmarks), of which ``deep1m``,
  ``deep10m``, ``deep100m``, ``bigann-1m``, ``bigann-10m``, ``bigann-100m`` use the first N
  base rows (no stored ground truth: ``Dataset.ground_truth`` computes and caches it);
* ``NAME.hdf5`` for any other name: an ann-benchmarks file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .bigann import BIN_DTYPES
from .dataset import Dataset
from .formats import read_vectors
from .hdf5 import read_ann_hdf5


@dataclass(frozen=True)
class _Spec:
    folder: str            # relative to a data root
    files: dict            # role ('base', 'test', 'learn', 'gt', 'meta') -> file name
    metric: str
    fetch: str             # how to get the files; '{root}' is the data directory
    optional: tuple = ()   # roles that may be missing (then None)
    n_base: int | None = None  # use only the first n_base base rows


def _project_sets() -> dict[str, _Spec]:
    files = {role: f"{role}.npy" for role in ("base", "test", "learn", "gt")}
    files["meta"] = "meta.json"
    metrics = {"fashion-mnist-784": "l2", "mnist-784": "l2", "glove-6B-50d": "angular",
               "sift-photos-128": "l2"}
    # fetch builds NAME and NAME-small together.
    return {name + small: _Spec(name + small, files, metric,
                                f"../shared/data/fetch {{root}} --sets {name}  "
                                "(from a project checkout)")
            for name, metric in metrics.items() for small in ("", "-small")}


def _texmex(prefix: str) -> _Spec:
    files = {"base": f"{prefix}_base.fvecs", "test": f"{prefix}_query.fvecs",
             "learn": f"{prefix}_learn.fvecs", "gt": f"{prefix}_groundtruth.ivecs"}
    return _Spec(prefix, files, "l2", f"curl -L ftp://ftp.irisa.fr/local/texmex/corpus/"
                                      f"{prefix}.tar.gz | tar -xz -C {{root}}")


def _big_ann(folder: str, url: str, ext: str, d: int, learn: str, n_base: int) -> _Spec:
    base = f"base.1B.{ext}"
    # Only the first n_base rows are used: download just those plus the 8-byte header,
    # then set the header's n to the rows present so the file validates.
    crop = (f"curl -r 0-{8 + n_base * d * BIN_DTYPES['.' + ext].itemsize - 1} -o {base} "
            f"{url}/{base}"
            f" && python -c \"import numpy as np; "
            f"np.memmap('{base}', '<u4', 'r+', shape=(1,))[0] = {n_base}\"")
    fetch = (f"mkdir -p {{root}}/{folder} && cd {{root}}/{folder} && "
             f"curl -O {url}/query.public.10K.{ext} && {crop}   "
             f"(optional training sample: {url}/{learn}; a larger base serves smaller subsets)")
    return _Spec(folder, {"base": base, "test": f"query.public.10K.{ext}", "learn": learn},
                 "l2", fetch, optional=("learn",), n_base=n_base)


_DEEP_URL = "https://storage.yandexcloud.net/yandex-research/ann-datasets/DEEP"
_BIGANN_URL = "https://dl.fbaipublicfiles.com/billion-scale-ann-benchmarks/bigann"
_SIZES = {"1m": 10**6, "10m": 10**7, "100m": 10**8}

_REGISTRY: dict[str, _Spec] = {
    **_project_sets(),
    "sift1m": _texmex("sift"),
    "gist1m": _texmex("gist"),
    **{f"deep{s}": _big_ann("deep1b", _DEEP_URL, "fbin", 96, "learn.350M.fbin", n)
       for s, n in _SIZES.items()},
    **{f"bigann-{s}": _big_ann("bigann", _BIGANN_URL, "u8bin", 128, "learn.100M.u8bin", n)
       for s, n in _SIZES.items()},
}

# ann-benchmarks 'distance' attribute -> our metric name
_ANN_METRICS = {"euclidean": "l2", "angular": "angular"}


def list_datasets() -> list[str]:
    """Names ``load_dataset`` knows (any ``NAME.hdf5`` in a data root also loads)."""
    return sorted(_REGISTRY)


def search_roots(data_dir=None) -> list[Path]:
    """Folders searched for data sets, in order: the data directory, then the shared one.

    Parameters
    ----------
    data_dir : str or Path or None
        Explicit data directory; None: ``$FLASHGMM_DATA`` or ``~/.cache/flashgmm-ivf/data``.
    """
    roots = [paths.data_dir(data_dir), paths.shared_data_dir()]
    return [r for i, r in enumerate(roots) if r not in roots[:i]]


def load_dataset(name: str, *, data_dir=None) -> Dataset:
    """Open a named data set, memory-mapped.

    Parameters
    ----------
    name : str
        One of ``list_datasets()``, or the stem of an ann-benchmarks ``NAME.hdf5`` file.
    data_dir : str or Path or None
        Data directory searched first; None: ``$FLASHGMM_DATA`` or
        ``~/.cache/flashgmm-ivf/data``.  The shared folder is searched after it.

    Returns
    -------
    Dataset

    Raises
    ------
    FileNotFoundError
        A known set's files are in no searched folder; the message lists the expected files
        and the command that fetches them.
    ValueError
        Unknown name.
    """
    roots = search_roots(data_dir)
    spec = _REGISTRY.get(name)
    if spec is None:
        return _load_ann_hdf5(name, roots)
    required = [f for role, f in spec.files.items() if role not in spec.optional]
    for root in roots:
        folder = root / spec.folder
        if all((folder / f).is_file() for f in required):
            return _load(name, spec, folder)
    searched = "\n".join(
        f"  {root / spec.folder}  (missing: "
        f"{', '.join(f for f in required if not (root / spec.folder / f).is_file())})"
        for root in roots)
    raise FileNotFoundError(
        f"dataset {name!r} not found: expected the files {', '.join(required)} in one of\n"
        f"{searched}\nFetch it with:\n  {spec.fetch.format(root=roots[0])}\n"
        f"(the data directory is data_dir=, else ${paths.DATA_ENV}, "
        f"else ~/.cache/flashgmm-ivf/data)")


def _load(name: str, spec: _Spec, folder: Path) -> Dataset:
    arrays = {role: read_vectors(folder / file, count=spec.n_base if role == "base" else None)
              if (folder / file).is_file() else None  # an absent optional role
              for role, file in spec.files.items() if role != "meta"}
    meta = {}
    if "meta" in spec.files:
        meta = json.loads((folder / spec.files["meta"]).read_text())
        if meta.get("metric", spec.metric) != spec.metric:
            raise ValueError(f"{folder / spec.files['meta']}: metric {meta['metric']!r}, but "
                             f"{name!r} is registered as {spec.metric!r}")
    return Dataset(name=name, metric=spec.metric, meta=meta, **arrays)


def _load_ann_hdf5(name: str, roots: list[Path]) -> Dataset:
    for root in roots:
        path = root / f"{name}.hdf5"
        if path.is_file():
            f = read_ann_hdf5(path)
            if f.distance not in _ANN_METRICS:
                raise ValueError(f"{path}: distance {f.distance!r} is not supported; "
                                 f"supported: {sorted(_ANN_METRICS)}")
            return Dataset(name=name, metric=_ANN_METRICS[f.distance], base=f.train,
                           test=f.test, gt=f.neighbors, meta={"path": str(path)})
    raise ValueError(f"unknown dataset {name!r}: known names are {', '.join(list_datasets())}; "
                     f"an ann-benchmarks file {name}.hdf5 in "
                     f"{' or '.join(str(r) for r in roots)} also loads")
