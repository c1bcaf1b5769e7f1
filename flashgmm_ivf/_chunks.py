"""Re-iterable blocks of rows, so one EM code path serves arrays, memmaps, h5py and generators.

EM reads the data once per iteration; only a few blocks of ``chunk_size`` rows are
ever in memory (or on the GPU) at a time, so N may exceed both. On CUDA,
:func:`device_blocks` streams them through pinned host buffers, overlapping the
disk read and the host-to-device copy of the next block with the compute on this one.
"""
from __future__ import annotations

import copy
import inspect
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._validation import NonFiniteRows, check_block, not_2d_message


class ChunkSource:
    """Blocks ``(offset, rows)`` of a 2-D data set, readable any number of times.

    Parameters
    ----------
    data : array-like of shape (n, D) (ndarray, np.memmap, h5py.Dataset, torch.Tensor, anything with
        ``shape`` and row slicing), a re-iterable of such blocks (list, tuple), or a callable
        returning a fresh iterable of blocks on each call.
    chunk_size : rows per block when ``data`` is sliceable.
    checked : bool, default=False
        The blocks are known to be valid (a copy of a validated source): passes skip the
        per-block checks, whose finiteness test on a CUDA tensor would wait for the GPU.
    """

    def __init__(self, data, chunk_size: int, *, name="X", checked=False):
        self.name = name
        self.chunk_size = chunk_size
        self.checked = checked
        self._rows = None  # the data when it is one sliceable array or tensor
        self.owned = False  # ``_rows`` is a copy this library made (``reading(owned=True)``)
        if inspect.isgenerator(data) or isinstance(data, Iterator):
            raise TypeError(f"{name} is a one-shot iterator, but EM reads the data once per iteration: "
                            "pass a callable that returns a fresh iterable of chunks (e.g. lambda: gen())")
        if callable(data) and not hasattr(data, "shape"):
            self._blocks: Callable[[], Iterable] = data
            self.n_samples = None
            self.n_features = None
        elif hasattr(data, "shape") and hasattr(data, "__getitem__"):
            if len(data.shape) != 2:
                raise ValueError(not_2d_message(name, data.shape))
            self._blocks = _slices(data, chunk_size)
            self._rows = data
            self.n_samples, self.n_features = int(data.shape[0]), int(data.shape[1])
        elif isinstance(data, (list, tuple)):
            self._blocks = lambda: iter(data)
            self.n_samples = None
            self.n_features = None
        else:
            raise TypeError(f"{name} must be an array, a list of arrays or a callable returning chunks, "
                            f"got {type(data).__name__}")

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | torch.Tensor]]:
        # Once counted (validate, or a first pass), every pass must bring the same rows: EM
        # and the truncated E-step's per-row state index them by position.
        expected = self.n_samples
        offset = 0
        for block in self._blocks():
            if not self.checked:
                block = check_block(block, n_features=self.n_features, offset=offset, name=self.name)
            if self.n_features is None:
                self.n_features = int(block.shape[1])
            if expected is not None and offset + block.shape[0] > expected:
                raise self._changed(expected, f"more than {expected}")
            if block.shape[0]:
                yield offset, block
            offset += block.shape[0]
        if expected is not None and offset != expected:
            raise self._changed(expected, offset)
        self.n_samples = offset

    def _changed(self, expected, got) -> ValueError:
        return ValueError(f"{self.name} changed between passes over the data: the first pass had {expected} rows, "
                          f"this one {got}; a callable source must return the same chunks on every call")

    def as_checked(self, chunk_size: int | None = None) -> ChunkSource:
        """This source with its blocks marked valid (once :meth:`validate` has passed): later
        passes skip the per-block checks. ``chunk_size`` re-blocks one sliceable array."""
        if chunk_size is not None and self._rows is not None:
            return self.reading(self._rows, chunk_size)
        twin = copy.copy(self)
        twin.checked = True
        return twin

    def reading(self, rows, chunk_size: int | None = None, *, owned: bool = False) -> ChunkSource:
        """A copy of this validated source that reads ``rows`` (the same rows, held elsewhere: a
        device copy) in blocks of ``chunk_size`` (default this source's), marked checked;
        ``owned``: ``rows`` is a copy made for this source alone, which ``permute_rows_`` may reorder.

        A copy, not a new ``ChunkSource``: a subclass keeps its type and what it knows beyond
        the rows (a data-parallel shard its global row count and offset).
        """
        twin = copy.copy(self)
        twin.chunk_size = chunk_size or self.chunk_size
        twin._rows, twin._blocks, twin.checked = rows, _slices(rows, twin.chunk_size), True
        twin.owned = owned
        return twin

    def permute_rows_(self, offset: int, order: torch.Tensor) -> None:
        """Reorder rows ``offset .. offset + len(order)`` in place, row i taking row ``order[i]``
        of that range: only the library's own copy (``owned``), never the caller's data. The
        rows change only once their reordered copy exists: if that copy does not fit, they are
        left as they were."""
        if not self.owned:
            raise ValueError("only a copy the library owns may be reordered, not the caller's rows")
        rows = self._rows[offset:offset + len(order)]
        rows.copy_(rows[order])

    def resident_on(self, device: torch.device) -> bool:
        """Whether the data is one tensor on ``device`` (each pass then only slices it)."""
        return self._rows is not None and _on_device(self._rows, device)

    def validate(self) -> int:
        """One full pass checking every block; returns n_samples.

        Non-finite rows are counted over the whole data set before raising, so the
        message gives the total and the first index.
        """
        count, first, offset, max_abs = 0, None, 0, 0.0
        for block in self._blocks():
            try:
                block = check_block(block, n_features=self.n_features, offset=offset, name=self.name)
            except NonFiniteRows as bad:
                count += _count_nonfinite(block)
                first = bad.first if first is None else first
            else:
                max_abs = max(max_abs, _max_abs(block))
            if self.n_features is None:
                self.n_features = int(np.shape(block)[1])
            offset += block.shape[0]
        if count:
            raise NonFiniteRows(count, first, self.name)
        self.n_samples = offset
        self.max_abs = max_abs
        return offset


def _slices(data, chunk_size: int) -> Callable[[], Iterator]:
    """A callable returning fresh blocks of ``chunk_size`` rows of the sliceable ``data``."""
    return lambda: (data[i:i + chunk_size] for i in range(0, data.shape[0], chunk_size))


def _max_abs(block) -> float:
    """Largest |value| of a finite block (0 when empty)."""
    if not block.shape[0] or not block.shape[1]:
        return 0.0
    # From min and max: no |x| temporary, and no overflow at an integer type's minimum.
    return max(-float(block.min()), float(block.max()))


def _count_nonfinite(block) -> int:
    if isinstance(block, torch.Tensor):
        return int((~torch.isfinite(block).all(dim=1)).sum())
    return int((~np.isfinite(np.asarray(block)).all(axis=1)).sum())


# Block dtypes that travel to the device as they are: uint8/int8 stay compact (the kernels
# widen them), float64 stays exact; integers of more than 16 bits become float64 (float32
# would round 2**24 + 1); anything else becomes float32.
_KEPT_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8,
                np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
_WIDE_INTEGERS = {np.dtype(t) for t in (np.int32, np.uint32, np.int64, np.uint64)}
_WIDE_INTEGER_TENSORS = {torch.int32, torch.int64, torch.uint32, torch.uint64}
# Blocks read ahead (pinned buffers) and blocks handed out whose compute may still run:
# one being read, one being copied, one being computed on.
PREFETCH_DEPTH = 3
# Threads copying rows (from the page cache or the disk) into pinned memory: one thread's
# memcpy out of a memmap runs at a few GB/s, less than a fast E-step consumes; half the
# cores, at most 4, leave the rest to the caller.
READER_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def kept_dtype(block) -> torch.dtype:
    """The dtype ``to_tensor`` gives ``block`` on the device."""
    if isinstance(block, torch.Tensor):
        if block.dtype in _WIDE_INTEGER_TENSORS:
            return torch.float64
        return block.dtype if block.dtype in _KEPT_DTYPES.values() else torch.float32
    if np.dtype(block.dtype) in _WIDE_INTEGERS:
        return torch.float64
    return _KEPT_DTYPES.get(np.dtype(block.dtype), torch.float32)


def to_tensor(block, device: torch.device) -> torch.Tensor:
    """A block on ``device``: uint8/int8 stay compact (the kernels widen them), float64 stays exact,
    anything else becomes float32."""
    if not isinstance(block, torch.Tensor):
        block = np.ascontiguousarray(block)
        # numpy calls a one-row array contiguous whatever its row stride, and torch refuses a
        # negative stride: copy such a view.
        if any(stride < 0 for stride in block.strides):
            block = block.copy()
        # torch wants writable memory; a read-only memmap chunk is copied (one chunk, not the data set).
        block = torch.from_numpy(block if block.flags.writeable else block.copy())
    return block.to(device=device, dtype=kept_dtype(block), non_blocking=True)


def device_blocks(source: Iterable, device: torch.device, *, depth: int = PREFETCH_DEPTH,
                  readers: int = READER_THREADS) -> Iterator[tuple[int, torch.Tensor]]:
    """Blocks ``(offset, tensor)`` of ``source`` moved to ``device`` (as :func:`to_tensor`).

    On CUDA, numpy blocks (arrays, memmaps, h5py reads) are copied by ``readers`` background
    threads into ``depth`` pinned host buffers and from there to the GPU on a side stream;
    the compute stream waits on each copy's event only. Reading and copying the next blocks
    thus overlap the compute on this one, and at most ``depth`` blocks handed out may still
    be in use on the GPU (the generator waits for the oldest before reading further), so
    device memory stays O(depth * chunk_size * D). torch tensors are moved as they are; those
    already on the device (a cached copy) are handed out without any wait.
    Elsewhere (CPU) this is ``to_tensor`` of each block, in the caller's thread.

    Every tensor is a fresh allocation or the caller's own tensor: the consumer may keep it
    past the next block.

    Parameters
    ----------
    source : iterable of ``(offset, block)``, e.g. a :class:`ChunkSource`
    device : torch.device
    depth : int, blocks read ahead and blocks in flight on the GPU
    readers : int, threads filling the pinned buffers

    Yields
    ------
    offset : int
    x : Tensor on ``device``
    """
    if device.type != "cuda":
        return ((offset, to_tensor(block, device)) for offset, block in source)
    return _pinned_blocks(source, device, depth, readers)


def device_copy(source: ChunkSource, device: torch.device, max_bytes: float,
                chunk_size: int | None = None) -> ChunkSource | None:
    """The validated ``source`` copied once into one tensor on ``device``, as a checked
    ``ChunkSource`` over it (in blocks of ``chunk_size`` rows, default the source's); None
    when that tensor would take more than ``max_bytes``. When the blocks are tensors on
    ``device`` already, the source itself, marked checked (a second copy would only cost
    memory, and re-checking each block every pass waits for the GPU).

    EM reads the data once per iteration: from such a copy a pass costs no host reads and
    no host-to-device copies (for 390,000 SIFT rows on an H100, streaming them cost more
    than the E-step itself). On CUDA, float rows that are all byte-sized integers are held
    as bytes (:func:`compact`), also when they are a float tensor on the GPU already: their byte
    copy takes a quarter of their memory and every pass reads a quarter of the bytes.
    """
    first = next(iter(source), None)
    if first is None:
        return None
    if _on_device(first[1], device):
        rows = source._rows
        if rows is not None and device.type == "cuda" and rows.shape[0] * rows.shape[1] <= max_bytes:
            packed = compact(rows)
            if packed is not rows:
                return source.reading(packed, chunk_size, owned=True)
        return source.as_checked(chunk_size)
    dtype = kept_dtype(first[1])
    if source.n_samples * source.n_features * dtype.itemsize > max_bytes:
        return None
    rows = torch.empty((source.n_samples, source.n_features), dtype=dtype, device=device)
    for offset, x in device_blocks(source, device):
        rows[offset:offset + x.shape[0]] = x
    return source.reading(compact(rows) if device.type == "cuda" else rows, chunk_size, owned=True)


# Byte dtypes a float copy is held in when every value fits: (dtype, least, largest).
_BYTES = ((torch.uint8, 0, 255), (torch.int8, -128, 127))
_CHECK_ROWS = 1 << 16


def compact(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` held in one byte a value where every value is an integer a byte holds (SIFT's
    0..255 stored as float32, as .fvecs files and most loaders give them), else ``rows`` itself.

    The kernels widen bytes to exactly the same floats, and every EM pass then reads a quarter
    of the memory (the statistics gather each candidate's row again). The check costs one pass
    over the copy, once per fit.
    """
    if not rows.is_floating_point() or rows.numel() == 0:
        return rows
    least, largest = (float(v) for v in rows.aminmax())
    for dtype, lo, hi in _BYTES:
        if lo <= least and largest <= hi:
            # Checked in blocks: a whole-copy rows.round() would take as much memory as the copy.
            whole = all(bool((block == block.round()).all()) for block in rows.split(_CHECK_ROWS))
            return rows.to(dtype) if whole else rows
    return rows


def _on_device(block, device: torch.device) -> bool:
    return (isinstance(block, torch.Tensor) and block.device.type == device.type
            and device.index in (None, block.device.index))


class _PinnedSlot:
    """A pinned host buffer and the event of the last host-to-device copy out of it."""

    __slots__ = ("copied", "host")

    def __init__(self):
        self.host = None
        self.copied = None

    def fill(self, block: np.ndarray) -> torch.Tensor:
        """Copy ``block`` into the buffer (growing it as needed) once its last copy is done; return the view."""
        if self.copied is not None:
            self.copied.synchronize()
        dtype = kept_dtype(block)
        n, d = block.shape
        if self.host is None or self.host.dtype != dtype or self.host.shape[1] != d or self.host.shape[0] < n:
            # torch's caching host allocator recycles these between EM passes.
            self.host = torch.empty((n, d), dtype=dtype, pin_memory=True)
        view = self.host[:n]
        # The dtype conversion to_tensor would do ('unsafe' as torch's .to), fused with the read.
        np.copyto(view.numpy(), block, casting="unsafe")
        return view


def _pinned_blocks(source, device, depth, readers):
    compute = torch.cuda.current_stream(device)
    copier = torch.cuda.Stream(device)
    slots = [_PinnedSlot() for _ in range(depth)]
    blocks = iter(source)
    # Read ahead in order: (offset, slot, future of its filled view) or (offset, None, tensor).
    pending = deque()
    in_use = deque()
    filled = 0
    with ThreadPoolExecutor(readers, thread_name_prefix="flashgmm-read") as pool:
        def read_ahead():
            nonlocal filled
            while len(pending) < depth and (item := next(blocks, None)) is not None:
                offset, block = item
                if isinstance(block, torch.Tensor):
                    pending.append((offset, None, block))
                    continue
                # A slot comes round again only after its previous block's copy was queued
                # (popped below); fill() then waits for that copy to finish.
                slot = slots[filled % depth]
                filled += 1
                pending.append((offset, slot, pool.submit(slot.fill, block)))

        read_ahead()
        while pending:
            offset, slot, item = pending.popleft()
            if slot is None:
                x = to_tensor(item, device)
            else:
                host = item.result()
                with torch.cuda.stream(copier):
                    x = torch.empty(host.shape, dtype=host.dtype, device=device)
                    x.copy_(host, non_blocking=True)
                    slot.copied = torch.cuda.Event()
                    slot.copied.record(copier)
                compute.wait_event(slot.copied)
                # x was allocated on the copy stream: keep its memory until the compute is done.
                x.record_stream(compute)
            read_ahead()
            yield offset, x
            if x is item:
                # Already on the device (a cached copy): nothing was allocated or copied for
                # it, so there is no memory to bound, and waiting would only stall the host.
                continue
            done = torch.cuda.Event()
            done.record(compute)
            in_use.append(done)
            if len(in_use) >= depth:
                in_use.popleft().synchronize()
