"""Re-iterable blocks of rows, so one EM code path serves arrays, memmaps, h5py and generators.

EM reads the data once per iteration; only one block of ``chunk_size`` rows is
ever in memory (or on the GPU) at a time, so N may exceed both.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ._validation import NonFiniteRows, check_block


class ChunkSource:
    """Blocks ``(offset, rows)`` of a 2-D data set, readable any number of times.

    Parameters
    ----------
    data : array-like of shape (n, D) (ndarray, np.memmap, h5py.Dataset, torch.Tensor, anything with
        ``shape`` and row slicing), a re-iterable of such blocks (list, tuple), or a callable
        returning a fresh iterable of blocks on each call.
    chunk_size : rows per block when ``data`` is sliceable.
    """

    def __init__(self, data, chunk_size: int, *, name="X"):
        self.name = name
        self.chunk_size = chunk_size
        if inspect.isgenerator(data) or isinstance(data, Iterator):
            raise TypeError(f"{name} is a one-shot iterator, but EM reads the data once per iteration: "
                            "pass a callable that returns a fresh iterable of chunks (e.g. lambda: gen())")
        if callable(data) and not hasattr(data, "shape"):
            self._blocks: Callable[[], Iterable] = data
            self.n_samples = None
            self.n_features = None
        elif hasattr(data, "shape") and hasattr(data, "__getitem__"):
            if len(data.shape) != 2:
                raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {tuple(data.shape)}")
            self._blocks = lambda: (data[i:i + chunk_size] for i in range(0, data.shape[0], chunk_size))
            self.n_samples, self.n_features = int(data.shape[0]), int(data.shape[1])
        elif isinstance(data, (list, tuple)):
            self._blocks = lambda: iter(data)
            self.n_samples = None
            self.n_features = None
        else:
            raise TypeError(f"{name} must be an array, a list of arrays or a callable returning chunks, "
                            f"got {type(data).__name__}")

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        offset = 0
        for block in self._blocks():
            block = check_block(block, n_features=self.n_features, offset=offset, name=self.name)
            if self.n_features is None:
                self.n_features = int(block.shape[1])
            if block.shape[0]:
                yield offset, block
            offset += block.shape[0]
        self.n_samples = offset

    def validate(self) -> int:
        """One full pass checking every block; returns n_samples.

        Non-finite rows are counted over the whole data set before raising, so the
        message gives the total and the first index.
        """
        count, first, offset = 0, None, 0
        for block in self._blocks():
            try:
                check_block(block, n_features=self.n_features, offset=offset, name=self.name)
            except NonFiniteRows as bad:
                count += _count_nonfinite(block)
                first = bad.first if first is None else first
            if self.n_features is None:
                self.n_features = int(np.shape(block)[1])
            offset += block.shape[0]
        if count:
            raise NonFiniteRows(count, first, self.name)
        self.n_samples = offset
        return offset


def _count_nonfinite(block) -> int:
    if isinstance(block, torch.Tensor):
        return int((~torch.isfinite(block).all(dim=1)).sum())
    return int((~np.isfinite(np.asarray(block)).all(axis=1)).sum())


def to_tensor(block, device: torch.device) -> torch.Tensor:
    """A block on ``device``: uint8/int8 stay compact (the kernels widen them), float64 stays exact,
    anything else becomes float32."""
    if not isinstance(block, torch.Tensor):
        block = np.ascontiguousarray(block)
        # torch wants writable memory; a read-only memmap chunk is copied (one chunk, not the data set).
        block = torch.from_numpy(block if block.flags.writeable else block.copy())
    t = block
    if t.dtype not in (torch.uint8, torch.int8, torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.to(device, non_blocking=True)
