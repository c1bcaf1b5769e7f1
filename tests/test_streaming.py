"""Streaming blocks to the device: pinned, prefetched copies on CUDA, plain ``to_tensor`` on CPU."""
import warnings

import numpy as np
import pytest
import torch

from flashgmm_ivf import GaussianMixture, mixture
from flashgmm_ivf._chunks import ChunkSource, compact, device_blocks, device_copy, to_tensor

CONVERSIONS = {
    "uint8": lambda x: x,
    "float16": lambda x: x.astype(np.float16),
    "float64": lambda x: x.astype(np.float64),
    "int64": lambda x: x.astype(np.int64),
    "strided": lambda x: np.repeat(x, 2, axis=1)[:, ::2],
    "torch": lambda x: torch.from_numpy(x.astype(np.float32)),
}


def rows(n=1000, d=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, d), dtype=np.uint8)


def memmap_of(x, tmp_path):
    np.save(tmp_path / "x.npy", x)
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def assert_same_blocks(data, device, chunk_size=97):
    source = ChunkSource(data, chunk_size)
    got = list(device_blocks(source, device))
    want = [(offset, to_tensor(block, "cpu")) for offset, block in source]
    assert [o for o, _ in got] == [o for o, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g.device.type == device.type and g.dtype == w.dtype
        assert torch.equal(g.cpu(), w)


@pytest.mark.parametrize("convert", list(CONVERSIONS.values()), ids=list(CONVERSIONS))
def test_cpu_blocks_are_plain_to_tensor(convert):
    assert_same_blocks(convert(rows()), torch.device("cpu"))


def test_cpu_blocks_from_memmap_and_generator(tmp_path):
    x = rows()
    assert_same_blocks(memmap_of(x, tmp_path), torch.device("cpu"))
    assert_same_blocks(lambda: (x[i:i + 301] for i in range(0, len(x), 301)), torch.device("cpu"))


def test_cpu_memmap_fit_matches_in_memory_fit(tmp_path):
    x = rows(2000, 8)
    fit = {"max_iter": 4, "tol": 0.0, "random_state": 0, "device": "cpu", "chunk_size": 300}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GaussianMixture(5, **fit).fit(x)
        got = GaussianMixture(5, **fit).fit(memmap_of(x, tmp_path))
    np.testing.assert_array_equal(got.means_, ref.means_)
    assert got.lower_bounds_ == ref.lower_bounds_


@pytest.mark.parametrize("convert", list(CONVERSIONS.values()), ids=list(CONVERSIONS))
def test_device_copy_holds_the_blocks_in_one_tensor(convert):
    x = convert(rows(1000, 12))
    source = ChunkSource(x, 97)
    source.validate()
    copy = device_copy(source, torch.device("cpu"), max_bytes=float("inf"))
    if isinstance(x, torch.Tensor):  # on the device already: no second copy, and no more checks
        assert copy is not source and copy.checked and not source.checked
        assert [b.data_ptr() for _, b in copy] == [b.data_ptr() for _, b in source]
        x[3, 5] = float("nan")  # past validate(), passes no longer look
        assert len(list(copy)) == len(list(ChunkSource(x, 97, checked=True)))
        with pytest.raises(ValueError, match="the first is row 3"):
            list(source)
        return
    assert copy.checked and copy.n_samples == 1000 and copy.chunk_size == 97
    got = list(copy)
    want = [(offset, to_tensor(block, "cpu")) for offset, block in source]
    assert [o for o, _ in got] == [o for o, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    itemsize = want[0][1].element_size()
    assert device_copy(source, torch.device("cpu"), max_bytes=1000 * 12 * itemsize - 1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_holds_byte_sized_integers_in_bytes(dtype):
    x = torch.from_numpy(rows(300, 7)).to(dtype)
    got = compact(x)
    assert got.dtype == torch.uint8 and torch.equal(got.to(dtype), x)
    signed = compact(x - 128)
    assert signed.dtype == torch.int8 and torch.equal(signed.to(dtype), x - 128)
    # One value a byte cannot hold exactly (first row, last column) keeps the whole copy as it is.
    for bad in (0.5, 256.0, -129.0, -0.25):
        y = x.clone()
        y[0, -1] = bad
        assert compact(y) is y
    assert compact(torch.from_numpy(rows(5, 3))).dtype == torch.uint8
    assert compact(torch.empty(0, 4, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_cache_data_must_be_auto_or_bool(bad):
    with pytest.raises(ValueError, match="cache_data must be one of 'auto', True, False"):
        GaussianMixture(2, cache_data=bad, device="cpu").fit(rows(50, 3))


# ---------------------------------------------------------------- CUDA: pinned buffers, side stream
@pytest.mark.gpu
@pytest.mark.parametrize("convert", list(CONVERSIONS.values()), ids=list(CONVERSIONS))
def test_pinned_blocks_equal_to_tensor(convert, tmp_path):
    x = convert(rows(5000, 33))
    assert_same_blocks(x, torch.device("cuda"), chunk_size=700)
    if isinstance(x, np.ndarray):
        assert_same_blocks(memmap_of(np.ascontiguousarray(x), tmp_path), torch.device("cuda"), chunk_size=700)


@pytest.mark.gpu
def test_pinned_blocks_survive_kept_references_and_early_stop():
    x = rows(10000, 16)
    kept = []
    for i, (offset, block) in enumerate(device_blocks(ChunkSource(x, 512), torch.device("cuda"), depth=2)):
        kept.append((offset, block * 1))   # the consumer's compute, queued on the current stream
        kept.append((offset, block))       # and the block itself, kept past the next one
        if i == 10:
            break
    torch.cuda.synchronize()
    for offset, block in kept:
        np.testing.assert_array_equal(block.cpu().numpy(), x[offset:offset + len(block)])


@pytest.mark.gpu
def test_pinned_streaming_keeps_device_memory_bounded(tmp_path):
    x = memmap_of(rows(200_000, 64), tmp_path)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    for _, block in device_blocks(ChunkSource(x, 8192), torch.device("cuda"), depth=3):
        total += block.double().sum()
    torch.cuda.synchronize()
    assert float(total) == float(x.sum(dtype=np.float64))
    # float64 temporaries of 2 blocks plus 4 blocks of uint8, far below the 25 blocks of the data.
    assert torch.cuda.max_memory_allocated() - base < 8 * 8192 * 64 * 8


@pytest.mark.gpu
@pytest.mark.parametrize("estep", ["dense", "truncated"])
@pytest.mark.parametrize("cache_data", ["auto", False])
def test_cuda_memmap_fit_matches_gpu_resident_fit(tmp_path, cache_data, estep, monkeypatch):
    """Streamed from a memmap through pinned buffers (False) or copied to the GPU once
    ('auto'), the fit equals the one of a tensor already on the GPU, bit for bit."""
    # Data on the GPU is read in blocks of >= CACHED_KERNEL_BLOCK rows; the streamed fit's
    # float32 partial sums agree bit for bit only over the same blocks (chunk_size).
    monkeypatch.setattr(mixture, "CACHED_KERNEL_BLOCK", 1)
    # A copy of its own ('auto') the fit groups by component, which sums in another order: bit for
    # bit only without (the grouping's own test: tests/test_gpu.py).
    monkeypatch.setattr(GaussianMixture, "_group_rows", lambda self, source: None)
    x = rows(50_000, 32)
    fit = {"max_iter": 5, "tol": 0.0, "random_state": 0, "device": "cuda", "chunk_size": 4096, "estep": estep}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = GaussianMixture(16, **fit).fit(torch.from_numpy(x).cuda())
        got = GaussianMixture(16, cache_data=cache_data, **fit).fit(memmap_of(x, tmp_path))
    np.testing.assert_array_equal(got.means_, ref.means_)
    assert got.lower_bounds_ == ref.lower_bounds_


def test_only_an_owned_copy_is_reordered():
    x = torch.from_numpy(rows(1000, 4))
    source = ChunkSource(x, 300)
    source.validate()
    with pytest.raises(ValueError, match="caller's rows"):
        source.permute_rows_(0, torch.arange(300))
    before = x.clone()
    # On the CPU device_copy hands a tensor back as it is: the caller's, never reordered.
    assert not device_copy(source, torch.device("cpu"), max_bytes=float("inf")).owned
    copy = device_copy(ChunkSource(x.numpy(), 300), torch.device("cpu"), max_bytes=float("inf"))
    assert copy.owned and copy.as_checked(600).owned is False
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    copy.permute_rows_(300, order)
    got = torch.cat([b for _, b in copy])
    assert torch.equal(got[300:600], before[300:600][order])
    assert torch.equal(got[:300], before[:300]) and torch.equal(got[600:], before[600:])
    assert torch.equal(x, before)


@pytest.mark.parametrize("room", [True, False])
def test_group_rows_moves_rows_and_their_hints_together(room, monkeypatch):
    from flashgmm_ivf.kernels.exact_candidates import Hints
    x = rows(1000, 4)
    copy = device_copy(ChunkSource(x, 300), torch.device("cpu"), max_bytes=float("inf"))
    gmm = GaussianMixture(3)
    best = {offset: torch.from_numpy(block[:, 0] % 3).to(torch.int32) for offset, block in ChunkSource(x, 300)}
    gmm._hints = {offset: Hints(b.clone()) for offset, b in best.items()}
    if not room:
        def no_room(self, offset, order):
            raise torch.cuda.OutOfMemoryError("no room")
        monkeypatch.setattr(ChunkSource, "permute_rows_", no_room)
    assert gmm._group_rows(copy) is room
    got = torch.cat([b for _, b in copy])
    assert all(h.grouped is room for h in gmm._hints.values())
    if not room:  # nothing moved, and the fit goes on
        assert torch.equal(got, torch.from_numpy(x))
        assert all(torch.equal(gmm._hints[o].best, b) for o, b in best.items())
        return
    for offset, b in best.items():
        block = got[offset:offset + len(b)]
        hint = gmm._hints[offset].best
        assert torch.equal(hint, torch.sort(b).values)  # grouped by component
        # Each row keeps its own hint: the hints are the rows' first feature mod 3, as before.
        assert torch.equal(hint, (block[:, 0] % 3).to(torch.int32))
        given = torch.from_numpy(x[offset:offset + len(b)])
        assert torch.equal(torch.sort(block.view(-1)).values, torch.sort(given.view(-1)).values)


def test_as_checked_reblocks_one_array_only():
    x = rows(1000, 4)
    source = ChunkSource(x, 300)
    assert [len(b) for _, b in source.as_checked(600)] == [600, 400]
    assert [len(b) for _, b in source.as_checked()] == [300, 300, 300, 100]
    listed = ChunkSource([x[:300], x[300:]], 300)
    assert [len(b) for _, b in listed.as_checked(600)] == [300, 700]  # a list keeps its own blocks
    assert ChunkSource(torch.from_numpy(x), 300).resident_on(torch.device("cpu"))
    assert not source.resident_on(torch.device("cpu")) and not listed.resident_on(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
@pytest.mark.parametrize("precision", ["candidates", "bf16x3"])
def test_fit_of_byte_valued_floats_equals_fit_of_bytes(covariance_type, precision):
    x = (np.random.default_rng(3).normal(size=(20000, 32)) * 30 + 120).clip(0, 255).round().astype(np.uint8)
    fit = dict(covariance_type=covariance_type, precision=precision, max_iter=5, tol=0.0, random_state=0,
               device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = GaussianMixture(16, **fit).fit(x)
        for floats in (x.astype(np.float32), torch.from_numpy(x.astype(np.float32)).cuda()):
            got = GaussianMixture(16, **fit).fit(floats)
            np.testing.assert_allclose(got.means_, want.means_, rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(got.lower_bounds_, want.lower_bounds_, rtol=1e-7)
