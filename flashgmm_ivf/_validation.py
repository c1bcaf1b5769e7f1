"""Input checks with messages that name the problem, the count and the first bad index."""
from __future__ import annotations

import numbers

import numpy as np
import torch

_ACCEPTED_KINDS = "biuf"  # bool, signed, unsigned, float


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
        if block.is_complex() or block.dtype == torch.bool:
            raise TypeError(f"{name} has unsupported dtype {block.dtype}; expected real numbers")
        finite_rows = torch.isfinite(block).all(dim=1) if block.dim() == 2 and block.is_floating_point() else None
    else:
        block = np.asarray(block)
        if block.dtype.kind not in _ACCEPTED_KINDS:
            raise TypeError(f"{name} has unsupported dtype {block.dtype}; expected real numbers")
        finite_rows = np.isfinite(block).all(axis=1) if block.ndim == 2 and block.dtype.kind == "f" else None
    if block.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got {block.ndim}-D with shape {tuple(block.shape)}")
    if n_features is not None and block.shape[1] != n_features:
        raise ValueError(f"{name} has {block.shape[1]} features, but the model expects {n_features}")
    if finite_rows is not None and not bool(finite_rows.all()):
        bad = np.flatnonzero(~np.asarray(finite_rows.cpu() if isinstance(finite_rows, torch.Tensor) else finite_rows))
        raise NonFiniteRows(int(bad.size), offset + int(bad[0]), name)
    return block


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
