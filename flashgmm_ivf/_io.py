"""GaussianMixture files: plain arrays in an .npz, a JSON header with a format version, and a checksum.

Members: ``header`` (UTF-8 JSON as uint8 bytes), ``weights``, ``means``, ``covariances``
(float64) and ``checksum`` (SHA-256 hex digest over the header bytes and every array's
dtype, shape and bytes, in that fixed order). Nothing is pickled
(``np.load(..., allow_pickle=False)``). On load the checksum is verified first, then every
value is checked for meaning (a distribution of weights, finite means, positive variances
or positive-definite covariances, header fields of the right type), so every way a file can
be wrong ends in a ValueError that names the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import tokenize
import zipfile
import zlib

import numpy as np

from ._validation import MAX_ABS_MEAN

FORMAT = "flashgmm_ivf.GaussianMixture"
FORMAT_VERSION = 2
_ARRAYS = ("weights", "means", "covariances")
_SAVED_PARAMS = ("n_components", "covariance_type", "tol", "reg_covar", "max_iter", "n_init", "init_params",
                 "random_state", "warm_start", "verbose", "device", "chunk_size", "compute_dtype", "precision",
                 "variance_floor", "estep", "n_candidates", "n_neighbors")
# Errors numpy's zip reader raises for damaged archives besides ValueError/OSError (a damaged
# .npy header dict fails in Python's tokenizer).
READ_ERRORS = (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError, zlib.error, NotImplementedError,
                RuntimeError, TypeError, AttributeError, SyntaxError, tokenize.TokenError)


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
    header_bytes = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    arrays = {name: np.ascontiguousarray(getattr(gmm, name + "_"), dtype=np.float64) for name in _ARRAYS}
    digest = checksum(header_bytes.tobytes(), arrays, _ARRAYS)
    members = dict(header=header_bytes, **arrays, checksum=np.array(digest))
    if hasattr(path, "write"):  # a file object (e.g. io.BytesIO inside an index file)
        np.savez(path, **members)
        return
    with open(path, "wb") as f:  # not np.savez(path): it would append '.npz' to other names
        np.savez(f, **members)


def load_mixture(cls, path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [m for m in ("header", "checksum") + _ARRAYS if m not in npz.files]
            if missing:
                raise ValueError(f"members {missing} are missing")
            members = {m: npz[m] for m in ("header", "checksum") + _ARRAYS}
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:  # TypeError/AttributeError: np.load gave a plain array, not an archive
        raise ValueError(f"{path}: not a readable {FORMAT} file (corrupt or truncated?): {err}") from err
    header_bytes, digest = members["header"], members["checksum"]
    if header_bytes.dtype != np.uint8 or header_bytes.ndim != 1 or digest.shape != () or digest.dtype.kind != "U":
        raise ValueError(f"{path}: malformed header or checksum member (a {FORMAT} file of another version?)")
    arrays = {name: members[name] for name in _ARRAYS}
    if checksum(header_bytes.tobytes(), arrays, _ARRAYS) != str(digest):
        raise ValueError(f"{path}: contents do not match the SHA-256 checksum (corrupt or edited file)")
    try:
        header = json.loads(header_bytes.tobytes().decode())
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            got = header.get("format") if isinstance(header, dict) else type(header).__name__
            raise ValueError(f"format is {got!r}, expected {FORMAT!r}")
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {header.get('format_version')!r} is not supported "
                             f"(this library reads version {FORMAT_VERSION})")
        gmm = cls(**header["params"])
        gmm._check_parameters()
        fitted = _check_fitted_fields(header["fitted"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: malformed {FORMAT} header: {err}") from err
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    _check_arrays(path, gmm, fitted["n_features_in_"], arrays)
    gmm.weights_, gmm.means_, gmm.covariances_ = arrays["weights"], arrays["means"], arrays["covariances"]
    try:
        gmm._set_precisions()
    except (ValueError, RuntimeError) as err:  # torch's Cholesky failure is a RuntimeError subclass
        raise ValueError(f"{path}: covariances are not usable: {err}") from err
    for name, value in fitted.items():
        setattr(gmm, name, value)
    return gmm


def checksum(header_bytes: bytes, arrays: dict, names) -> str:
    """SHA-256 over a file's header bytes and its arrays ``names`` (name, dtype, shape, bytes; in that order).

    Shared by the GaussianMixture and index files, so one edit of either part fails the check.
    """
    h = hashlib.sha256()
    h.update(len(header_bytes).to_bytes(8, "little"))
    h.update(header_bytes)
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _is_int(value, low):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_bound(value) -> bool:
    """A lower bound fit can produce: a number, -inf included, not NaN or +inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) \
        and value != math.inf


def _check_fitted_fields(fitted) -> dict:
    """The header's fitted attributes, each of the type and range fit produces."""
    if not isinstance(fitted, dict) or set(fitted) != {"converged_", "n_iter_", "lower_bound_", "lower_bounds_",
                                                       "n_reseeded_", "n_features_in_"}:
        raise ValueError("header field 'fitted' does not hold exactly the fitted attributes")
    bounds = fitted["lower_bounds_"]
    problems = [
        name for name, ok in (
            ("converged_", isinstance(fitted["converged_"], bool)),
            ("n_iter_", _is_int(fitted["n_iter_"], 0)),
            ("n_reseeded_", _is_int(fitted["n_reseeded_"], 0)),
            ("n_features_in_", _is_int(fitted["n_features_in_"], 1)),
            # -inf is the bound of a model built from parameters (never run through EM), and may
            # be an iteration's where a row's density underflows float64
            ("lower_bound_", _is_bound(fitted["lower_bound_"])),
            ("lower_bounds_", isinstance(bounds, list) and all(_is_bound(b) for b in bounds)),
        ) if not ok]
    if problems:
        raise ValueError(f"header fitted attribute(s) {problems} have the wrong type or range")
    return fitted


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
    weights, means, cov = arrays["weights"], arrays["means"], arrays["covariances"]
    if (weights < 0).any() or abs(weights.sum() - 1) > 1e-6:
        raise ValueError(f"{path}: weights do not form a distribution (sum {weights.sum()})")
    if (np.abs(means) > MAX_ABS_MEAN).any():
        row = int(np.flatnonzero((np.abs(means) > MAX_ABS_MEAN).any(axis=1))[0])
        raise ValueError(f"{path}: means of component {row} exceed {MAX_ABS_MEAN:g} in magnitude")
    if gmm.covariance_type != "full":
        bad = np.flatnonzero(~(cov > 0).reshape(k, -1).all(axis=1))
        if bad.size:
            raise ValueError(f"{path}: {bad.size} component(s) have variances <= 0 (first: component {bad[0]})")
        return
    for j in range(k):
        if not np.allclose(cov[j], cov[j].T, rtol=1e-10, atol=0):
            raise ValueError(f"{path}: covariance of component {j} is not symmetric")
        try:
            np.linalg.cholesky(cov[j])
        except np.linalg.LinAlgError as err:
            raise ValueError(f"{path}: covariance of component {j} is not positive definite") from err
