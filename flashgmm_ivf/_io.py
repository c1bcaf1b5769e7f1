"""GaussianMixture files: plain arrays in an .npz plus a JSON header with a format version.

Nothing is pickled (``np.load(..., allow_pickle=False)``), and every way a file can
be wrong (truncated, not an npz, another format or version, arrays that disagree
with the header) ends in a ValueError that names the file.
"""
from __future__ import annotations

import json
import zipfile

import numpy as np

FORMAT = "flashgmm_ivf.GaussianMixture"
FORMAT_VERSION = 1
_SAVED_PARAMS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
                 "random_state", "warm_start", "verbose", "device", "chunk_size", "compute_dtype", "precision",
                 "variance_floor", "estep", "n_candidates", "n_neighbors")


def save_mixture(gmm, path):
    gmm._check_fitted()
    random_state = gmm.random_state if isinstance(gmm.random_state, (int, type(None))) else None
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "params": {name: getattr(gmm, name) for name in _SAVED_PARAMS} | {"random_state": random_state},
        "fitted": {"converged_": bool(gmm.converged_), "n_iter_": int(gmm.n_iter_),
                   "lower_bound_": float(gmm.lower_bound_), "lower_bounds_": [float(b) for b in gmm.lower_bounds_],
                   "n_reseeded_": int(gmm.n_reseeded_), "n_features_in_": int(gmm.n_features_in_)},
    }
    arrays = dict(header=np.array(json.dumps(header)), weights=gmm.weights_, means=gmm.means_,
                  covariances=gmm.covariances_)
    if hasattr(path, "write"):  # a file object (e.g. io.BytesIO inside an index file)
        np.savez(path, **arrays)
        return
    with open(path, "wb") as f:  # not np.savez(path): it would append '.npz' to other names
        np.savez(f, **arrays)


def load_mixture(cls, path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ("header", "weights", "means", "covariances")}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable {FORMAT} file (corrupt or truncated?): {err}") from err
    try:
        header = json.loads(str(arrays["header"]))
        if header.get("format") != FORMAT:
            raise ValueError(f"format is {header.get('format')!r}, expected {FORMAT!r}")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {header.get('format_version')} is not supported "
                             f"(this library reads version {FORMAT_VERSION})")
        gmm = cls(**header["params"])
        fitted = header["fitted"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: malformed {FORMAT} header: {err}") from err
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    _check_arrays(path, gmm, fitted["n_features_in_"], arrays)
    gmm.weights_, gmm.means_, gmm.covariances_ = arrays["weights"], arrays["means"], arrays["covariances"]
    gmm._set_precisions()
    for name, value in fitted.items():
        setattr(gmm, name, value)
    return gmm


def _check_arrays(path, gmm, n_features, arrays):
    k, d = gmm.n_components, n_features
    expected = {"weights": (k,), "means": (k, d),
                "covariances": {"spherical": (k,), "diag": (k, d), "full": (k, d, d)}[gmm.covariance_type]}
    for name, shape in expected.items():
        a = arrays[name]
        if a.dtype != np.float64 or a.shape != shape:
            raise ValueError(f"{path}: array {name!r} is {a.dtype}{a.shape}, expected float64{shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{path}: array {name!r} holds NaN or infinity")
    if (arrays["weights"] < 0).any() or abs(arrays["weights"].sum() - 1) > 1e-6:
        raise ValueError(f"{path}: weights do not form a distribution (sum {arrays['weights'].sum()})")
