"""Input checks with messages that name the problem, the count and the first bad index."""
from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np
import torch

_ACCEPTED_KINDS = "biuf"  # bool, signed, unsigned, float
# Largest |x| a GaussianMixture models (fit's data, a model's means, a saved file's). Squared
# distances of larger values overflow float32 (FAISS k-means, the float32 E-step: 1e30 per
# coordinate leaves a factor 1e8 of headroom for the sums over features), and where they do not,
# the expanded form of the log-density loses all its digits to them.
MAX_ABS_VALUE = 1e15
# Largest |mean| of a model (from_parameters, a saved file): a mean of rows within MAX_ABS_VALUE,
# with room for its float32 round-off.
MAX_ABS_MEAN = 2 * MAX_ABS_VALUE


def check_block(block, *, n_features=None, offset=0, name="X"):
    """Check one block of rows; return it as a numpy array or torch tensor, unchanged in type.

    Parameters
    ----------
    block : array-like of shape (n, D)
    n_features : int or None, the expected D
    offset : int, global index of the block's first row (for messages)

    Raises
    ------
    TypeError for non-numeric data, ValueError for wrong shape or non-finite rows.
    """
    if isinstance(block, torch.Tensor):
        if block.is_complex():
            raise ValueError(f"{name} has dtype {block.dtype}: Complex data not supported")
        if block.dtype == torch.bool:
            raise TypeError(f"{name} has unsupported dtype {block.dtype}; expected real numbers")
        finite_rows = torch.isfinite(block).all(dim=1) if block.dim() == 2 and block.is_floating_point() else None
    else:
        block = np.asarray(block)
        if block.dtype.kind == "c":
            raise ValueError(f"{name} has dtype {block.dtype}: Complex data not supported")
        if block.dtype.kind not in _ACCEPTED_KINDS:
            raise TypeError(f"{name} has unsupported dtype {block.dtype}; expected real numbers")
        finite_rows = np.isfinite(block).all(axis=1) if block.ndim == 2 and block.dtype.kind == "f" else None
    if block.ndim != 2:
        raise ValueError(not_2d_message(name, block.shape))
    if n_features is not None and block.shape[1] != n_features:
        raise ValueError(f"{name} has {block.shape[1]} features, but the model is expecting {n_features} features "
                         "as input")
    if finite_rows is not None and not bool(finite_rows.all()):
        bad = np.flatnonzero(~np.asarray(finite_rows.cpu() if isinstance(finite_rows, torch.Tensor) else finite_rows))
        raise NonFiniteRows(int(bad.size), offset + int(bad[0]), name)
    return block


def not_2d_message(name, shape) -> str:
    """The error of a data set that is not 2-D (the advice quotes scikit-learn's)."""
    return (f"{name} must be 2-D (n_samples, n_features), got shape {tuple(shape)}. Reshape your data either using "
            "X.reshape(-1, 1) if it has a single feature or X.reshape(1, -1) if it is a single sample")


class NonFiniteRows(ValueError):
    """Rows holding NaN or infinity; ``count`` and ``first`` let a caller total them over blocks."""

    def __init__(self, count, first, name="X"):
        self.count, self.first, self.name = count, first, name
        super().__init__(f"{name} contains {count} row(s) with NaN or infinity; the first is row {first}")


def check_positive_int(value, name, *, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_nonnegative_float(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# Declarative parameter constraints (scikit-learn's ``_parameter_constraints`` style): each
# parameter maps to a list of accepted forms; a value must match one of them.
class Integer:
    """Integers in [low, high] (high None: unbounded); bool is not an integer here."""

    def __init__(self, low, high=None):
        self.low, self.high = low, high

    def accepts(self, value):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and self.low <= value and (self.high is None or value <= self.high)

    def __str__(self):
        return f"an integer in [{self.low}, {'inf' if self.high is None else self.high}]"


class Real:
    """Finite real numbers >= low."""

    def __init__(self, low):
        self.low = low

    def accepts(self, value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value)) and value >= self.low

    def __str__(self):
        return f"a finite number >= {self.low}"


class Options:
    """One of a fixed set of values (compared by type and value, so 1 is not True)."""

    def __init__(self, *values):
        self.values = values

    def accepts(self, value):
        return any(type(value) is type(v) and value == v for v in self.values)

    def __str__(self):
        return "one of " + ", ".join(repr(v) for v in self.values)


class Instances:
    """Instances of the given classes (None: the value None)."""

    def __init__(self, *types, label=None):
        self.types, self.label = types, label

    def accepts(self, value):
        return any(value is None if t is None else isinstance(value, t) for t in self.types)

    def __str__(self):
        return self.label or " or ".join("None" if t is None else t.__name__ for t in self.types)


class InvalidParameterError(ValueError, TypeError):
    """A parameter outside its accepted forms; both a ValueError and a TypeError (as
    scikit-learn's), so callers may catch either."""


def validate_params(constraints, params, owner):
    """Check every parameter against its list of accepted forms.

    Raises
    ------
    InvalidParameterError naming the parameter, the accepted forms and the value.
    """
    for name, forms in constraints.items():
        value = params[name]
        if any(form.accepts(value) for form in forms):
            continue
        expected = " or ".join(str(form) for form in forms)
        raise InvalidParameterError(f"{owner}: {name} must be {expected}, got {value!r}")


def as_rows(X, name="X"):
    """X in a form ``ChunkSource`` slices by rows: ndarrays (numeric), memmaps, h5py datasets and
    torch tensors as they are; other array-likes (nested lists, DataFrames, object arrays of
    numbers) through numpy. Sparse matrices are refused (a dense copy could be huge)."""
    if hasattr(X, "tocsr") or type(X).__module__.startswith("scipy.sparse"):
        raise TypeError(f"{name} is a sparse matrix; dense data is required (convert with X.toarray() if it fits)")
    if callable(X) or isinstance(X, Iterator):
        raise TypeError(f"{name} must be an array-like of shape (n_samples, n_features), got {type(X).__name__}; "
                        "pass data that arrives in chunks to fit_stream")
    if isinstance(X, torch.Tensor) or (isinstance(X, np.ndarray) and X.dtype != object) \
            or type(X).__module__.startswith("h5py"):
        return X
    try:
        rows = np.asarray(X)
        if rows.dtype == object:
            rows = rows.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise (TypeError if isinstance(err, TypeError) else ValueError)(
            f"{name} is not a rectangular array of numbers: {err}") from err
    return rows
