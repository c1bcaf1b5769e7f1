"""Tests of the dataset layer: file formats, registry, ground truth, angular handling."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import flashgmm_ivf.datasets as D
from flashgmm_ivf.datasets import groundtruth

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# suffix -> value dtype the format stores
BINARY = {".fvecs": np.float32, ".ivecs": np.int32, ".bvecs": np.uint8,
          ".fbin": np.float32, ".ibin": np.int32, ".u8bin": np.uint8, ".i8bin": np.int8}
ALL = {**BINARY, ".npy": np.float64, ".hdf5": np.float32, ".h5": np.int64}
TEXMEX = (".fvecs", ".ivecs", ".bvecs")
BIGANN = (".fbin", ".ibin", ".u8bin", ".i8bin")


def random_rows(dtype, n=37, d=5, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), (n, d), endpoint=True,
                            dtype=dtype)
    return rng.standard_normal((n, d)).astype(dtype)


# ---------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", ALL)
def test_round_trip(tmp_path, suffix):
    x = random_rows(ALL[suffix])
    path = tmp_path / f"x{suffix}"
    D.write_vectors(path, x)
    y = D.read_vectors(path)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y[:], x)
    np.testing.assert_array_equal(D.read_vectors(path, start=3, count=10), x[3:13])
    assert D.read_vectors(path, start=37).shape == (0, 5)


@pytest.mark.parametrize("suffix", [*BINARY, ".npy"])
def test_readers_memory_map(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    D.write_vectors(path, random_rows(ALL[suffix], n=1000))
    y = D.read_vectors(path, start=100)
    assert isinstance(y, np.memmap) and not y.flags.owndata and not y.flags.writeable
    assert y.shape == (900, 5)


def test_hdf5_read_is_lazy(tmp_path):
    path = tmp_path / "x.hdf5"
    D.write_vectors(path, random_rows(np.float32))
    assert isinstance(D.read_vectors(path), h5py.Dataset)


def test_write_streams_from_memmap_and_converts(tmp_path):
    x = random_rows(np.uint8, n=50)
    D.write_vectors(tmp_path / "x.bvecs", x)
    D.write_vectors(tmp_path / "x.fbin", D.read_vectors(tmp_path / "x.bvecs"))
    y = D.read_vectors(tmp_path / "x.fbin")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float32))


@pytest.mark.parametrize("suffix", TEXMEX)
def test_texmex_truncated(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    D.write_vectors(path, random_rows(BINARY[suffix]))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    with pytest.raises(ValueError, match=r"not a multiple of the record size .*truncated"):
        D.read_vectors(path)


@pytest.mark.parametrize("suffix", TEXMEX)
def test_texmex_wrong_row_header(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    D.write_vectors(path, random_rows(BINARY[suffix], d=4))
    record = 4 + 4 * np.dtype(BINARY[suffix]).itemsize
    with open(path, "r+b") as f:
        f.seek(7 * record)
        f.write(np.int32(3).tobytes())
    with pytest.raises(ValueError, match=r"row 7 has dimension header 3, expected 4"):
        D.read_vectors(path)
    # A window that excludes row 7 does not read its header.
    assert D.read_vectors(path, count=7).shape == (7, 4)


@pytest.mark.parametrize("suffix", TEXMEX)
def test_texmex_bad_first_header(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(np.int32(-2).tobytes() * 4)
    with pytest.raises(ValueError, match=r"row 0 has dimension header -2"):
        D.read_vectors(path)


@pytest.mark.parametrize("suffix", BIGANN)
def test_bigann_truncated(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    D.write_vectors(path, random_rows(BINARY[suffix]))
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 3)
    with pytest.raises(ValueError, match=rf"n=37, d=5 .*should be {full} bytes, but it is "
                                         rf"{full - 3} bytes \(truncated\)"):
        D.read_vectors(path)


@pytest.mark.parametrize("suffix", BIGANN)
def test_bigann_wrong_header(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    D.write_vectors(path, random_rows(BINARY[suffix]))
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.write(np.array([37, 6], dtype="<u4").tobytes())
    expected = 8 + 37 * 6 * np.dtype(BINARY[suffix]).itemsize
    with pytest.raises(ValueError, match=rf"should be {expected} bytes, but it is {size} bytes"):
        D.read_vectors(path)


@pytest.mark.parametrize("suffix", [".fvecs", ".fbin"])
def test_tiny_file(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="too short"):
        D.read_vectors(path)


def test_window_outside_file(tmp_path):
    path = tmp_path / "x.fbin"
    D.write_vectors(path, random_rows(np.float32))
    with pytest.raises(ValueError, match=r"rows 30\.\.40 requested but the file has only 37 rows"):
        D.read_vectors(path, start=30, count=10)
    with pytest.raises(ValueError, match=r"start=38 is outside 0\.\.37"):
        D.read_vectors(path, start=38)


def test_unknown_suffix(tmp_path):
    with pytest.raises(ValueError,
                       match=r"unknown vector file suffix '\.csv'; supported: .*\.fvecs"):
        D.read_vectors(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"unknown vector file suffix"):
        D.write_vectors(tmp_path / "x.txt", np.zeros((2, 2)))


def test_key_only_for_hdf5(tmp_path):
    with pytest.raises(ValueError, match="applies only to HDF5"):
        D.read_vectors(tmp_path / "x.npy", key="train")


def test_writer_refuses_lossy_casts(tmp_path):
    with pytest.raises(TypeError, match="cannot store float64 values in a int32 file"):
        D.write_vectors(tmp_path / "x.ivecs", np.ones((3, 2)))
    bad = np.zeros((5, 2), dtype=np.int64)
    bad[3, 1] = 300
    with pytest.raises(ValueError, match=r"row 3 has values outside the uint8 range"):
        D.write_vectors(tmp_path / "x.u8bin", bad)


def test_texmex_writer_refuses_empty(tmp_path):
    with pytest.raises(ValueError, match="at least one row"):
        D.write_vectors(tmp_path / "x.fvecs", np.zeros((0, 3), np.float32))


def test_npy_is_never_unpickled(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.array([[object()]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        D.read_vectors(path)


def test_npy_must_be_2d(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(4))
    with pytest.raises(ValueError, match=r"expected a 2-D array \(n, d\), got shape \(4,\)"):
        D.read_vectors(path)


def test_ann_hdf5_round_trip_and_missing_keys(tmp_path):
    path = tmp_path / "a.hdf5"
    parts = dict(train=random_rows(np.float32), test=random_rows(np.float32, n=4),
                 neighbors=np.random.default_rng(0).integers(0, 37, (4, 5), dtype=np.int32),
                 distances=random_rows(np.float32, n=4))
    D.write_ann_hdf5(path, **parts, distance="angular")
    for lazy in (True, False):
        f = D.read_ann_hdf5(path, lazy=lazy)
        assert f.distance == "angular"
        for key, value in parts.items():
            np.testing.assert_array_equal(getattr(f, key)[:], value)
    assert isinstance(D.read_ann_hdf5(path).train, h5py.Dataset)
    np.testing.assert_array_equal(D.read_vectors(path, key="test"), parts["test"])
    with h5py.File(path, "a") as f:
        del f["neighbors"]
    with pytest.raises(ValueError, match=r"missing dataset\(s\) \['neighbors'\]"):
        D.read_ann_hdf5(path)
    with pytest.raises(ValueError, match=r"no dataset 'neighbors'"):
        D.read_vectors(path, key="neighbors")


@pytest.mark.parametrize("change, match", [
    ({"test": random_rows(np.float32, n=4, d=6)}, r"b.hdf5: test has dimension 6, train has 5"),
    ({"neighbors": np.array([[0, 1], [2, 3], [4, 37], [-1, 0]])}, r"b.hdf5: neighbors row 2 holds id\(s\) "
                                                                   r"outside \[0, 37\) \(n_train = 37\): \[37\]"),
    ({"neighbors": np.array([[0, 1], [2, 3], [-1, 5], [0, 0]])}, r"neighbors row 2 holds .*\[-1\]"),
    ({"neighbors": np.zeros((3, 2), np.int64)}, r"neighbors \(3, 2\) and distances \(4, 2\) must both be"),
    ({"neighbors": np.zeros((4, 2))}, "neighbors must hold integer ids"),
])
def test_ann_hdf5_inconsistent_ground_truth(tmp_path, change, match):
    parts = dict(train=random_rows(np.float32), test=random_rows(np.float32, n=4),
                 neighbors=np.zeros((4, 2), np.int32), distances=np.zeros((4, 2), np.float32)) | change
    D.write_ann_hdf5(tmp_path / "b.hdf5", **parts, distance="euclidean")
    for lazy in (True, False):
        with pytest.raises(ValueError, match=match):
            D.read_ann_hdf5(tmp_path / "b.hdf5", lazy=lazy)


def test_iter_chunks(tmp_path):
    x = random_rows(np.float32, n=23)
    D.write_vectors(tmp_path / "x.fvecs", x)
    D.write_vectors(tmp_path / "x.h5", x)
    for source in (D.read_vectors(tmp_path / "x.fvecs"), D.read_vectors(tmp_path / "x.h5")):
        chunks = list(D.iter_chunks(source, 10))
        assert [s for s, _ in chunks] == [0, 10, 20]
        assert all(type(c) is np.ndarray for _, c in chunks)
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), x)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        next(D.iter_chunks(x, 0))


# ---------------------------------------------------------------- registry
def write_npy_set(folder, base, test, learn, gt, metric="l2"):
    folder.mkdir(parents=True)
    for role, array in dict(base=base, test=test, learn=learn, gt=gt).items():
        np.save(folder / f"{role}.npy", array)
    (folder / "meta.json").write_text(json.dumps({"metric": metric}))


def test_registry_uses_flashgmm_data(tmp_path, monkeypatch):
    base, test = random_rows(np.uint8, n=40), random_rows(np.uint8, n=3)
    gt = np.zeros((3, 100), np.int32)
    write_npy_set(tmp_path / "mnist-784-small", base, test, test, gt)
    monkeypatch.setenv("FLASHGMM_DATA", str(tmp_path))
    ds = D.load_dataset("mnist-784-small")  # found here before the shared folder
    assert ds.metric == "l2" and ds.meta["metric"] == "l2"
    assert isinstance(ds.base, np.memmap)
    np.testing.assert_array_equal(ds.base, base)
    assert D.search_roots()[0] == tmp_path


def test_registry_metric_mismatch(tmp_path):
    x = random_rows(np.float32, n=4)
    write_npy_set(tmp_path / "glove-6B-50d", x, x, x, np.zeros((4, 1), np.int32), metric="l2")
    with pytest.raises(ValueError, match="registered as 'angular'"):
        D.load_dataset("glove-6B-50d", data_dir=tmp_path)


def test_registry_texmex(tmp_path):
    (tmp_path / "sift").mkdir()
    base, queries = random_rows(np.float32, n=30, d=8), random_rows(np.float32, n=4, d=8, seed=1)
    for part, array in dict(base=base, query=queries, learn=base[:10]).items():
        D.write_vectors(tmp_path / "sift" / f"sift_{part}.fvecs", array)
    D.write_vectors(tmp_path / "sift" / "sift_groundtruth.ivecs",
                    D.exact_knn(base, queries, 5, "l2").astype(np.int32))
    ds = D.load_dataset("sift1m", data_dir=tmp_path)
    assert (ds.base.shape, ds.test.shape, ds.learn.shape, ds.gt.shape) == \
        ((30, 8), (4, 8), (10, 8), (4, 5))
    np.testing.assert_array_equal(ds.ground_truth(5, cache_dir=tmp_path / "c"), ds.gt)


def test_registry_bigann_first_rows(tmp_path):
    # A sparse file: the header claims 10**6 x 96 floats; nothing is read but the header.
    folder = tmp_path / "deep1b"
    folder.mkdir()
    with open(folder / "base.1B.fbin", "wb") as f:
        f.write(np.array([10**6, 96], "<u4").tobytes())
        f.truncate(8 + 10**6 * 96 * 4)
    D.write_vectors(folder / "query.public.10K.fbin", random_rows(np.float32, n=10, d=96))
    ds = D.load_dataset("deep1m", data_dir=tmp_path)
    assert ds.base.shape == (10**6, 96) and isinstance(ds.base, np.memmap)
    assert ds.learn is None and ds.gt is None
    with pytest.raises(ValueError, match=r"rows 0\.\.10000000 requested .* only 1000000 rows"):
        D.load_dataset("deep10m", data_dir=tmp_path)


def test_missing_dataset_names_files_and_fetch(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.load_dataset("mnist-784", data_dir=tmp_path)
    msg = str(err.value)
    for name in ("base.npy", "test.npy", "learn.npy", "gt.npy", "meta.json",
                 str(tmp_path / "mnist-784"), f"fetch {tmp_path} --sets mnist-784"):
        assert name in msg
    with pytest.raises(FileNotFoundError,
                       match=r"(?s)sift_base\.fvecs.*Fetch it with:.*sift\.tar\.gz"):
        D.load_dataset("sift1m", data_dir=tmp_path)


def test_unknown_name_and_ann_hdf5_fallback(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'nope': known names are .*sift1m"):
        D.load_dataset("nope", data_dir=tmp_path)
    x = random_rows(np.float32, n=20)
    D.write_ann_hdf5(tmp_path / "toy-angular.hdf5", train=x, test=x[:3],
                     neighbors=np.zeros((3, 2), np.int32), distances=np.zeros((3, 2), np.float32),
                     distance="angular")
    ds = D.load_dataset("toy-angular", data_dir=tmp_path)
    assert ds.metric == "angular" and isinstance(ds.base, h5py.Dataset)


# ---------------------------------------------------------------- ground truth
def brute_force(base, queries, k, metric):
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "angular":
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    score = ((q[:, None, :] - b[None]) ** 2).sum(-1) if metric == "l2" else -(q @ b.T)
    return np.argsort(score, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", D.METRICS)
def test_ground_truth_matches_brute_force(tmp_path, monkeypatch, metric):
    # A tiny block size makes the search merge results across many base blocks.
    monkeypatch.setattr(groundtruth, "_BASE_BLOCK_BYTES", 8 * 4 * 50)
    base = random_rows(np.float32, n=400, d=8)
    queries = random_rows(np.float32, n=25, d=8, seed=1)
    ids = D.ground_truth(base, queries, 10, metric, cache_dir=tmp_path)
    assert ids.shape == (25, 10)
    np.testing.assert_array_equal(ids, brute_force(base, queries, 10, metric))


def test_ground_truth_cache_is_hit(tmp_path, monkeypatch):
    base, queries = random_rows(np.float32, n=100), random_rows(np.float32, n=5, seed=1)
    first = D.ground_truth(base, queries, 7, "l2", cache_dir=tmp_path)
    [cached] = tmp_path.glob("gt-l2-k7-*.npy")

    def fail(*args):
        raise AssertionError("ground truth recomputed despite the cache")

    monkeypatch.setattr(groundtruth, "exact_knn", fail)
    np.testing.assert_array_equal(D.ground_truth(base, queries, 7, "l2", cache_dir=tmp_path),
                                  first)
    np.testing.assert_array_equal(np.load(cached, allow_pickle=False), first)
    with pytest.raises(AssertionError, match="recomputed"):  # other content, other key
        D.ground_truth(base[1:], queries, 7, "l2", cache_dir=tmp_path)


def test_ground_truth_validates():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"k must be in 1\.\.5"):
        D.ground_truth(x, x, 6)
    with pytest.raises(ValueError, match="queries have d=2 but base has d=3"):
        D.ground_truth(x, x[:, :2], 1)
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        D.ground_truth(x, x, 1, "cosine")


# ---------------------------------------------------------------- Dataset, angular
def test_normalize_rows():
    x = np.array([[3, 4], [0, 0], [-1, 0]], dtype=np.int64)
    np.testing.assert_allclose(D.normalize_rows(x), [[0.6, 0.8], [0, 0], [-1, 0]])


def test_angular_to_l2_ranks_like_cosine(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.standard_normal((300, 6)) * rng.uniform(0.1, 10, (300, 1))
    queries = rng.standard_normal((20, 6))
    ds = D.Dataset("toy", "angular", base=base, test=queries)
    flat = ds.to_l2()
    assert flat.metric == "l2" and flat.base.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(flat.base, axis=1), 1, rtol=1e-6)
    cosine = brute_force(base, queries, 10, "angular")
    np.testing.assert_array_equal(brute_force(flat.base, flat.test, 10, "l2"), cosine)
    np.testing.assert_array_equal(ds.ground_truth(10, cache_dir=tmp_path), cosine)
    with pytest.raises(ValueError, match="does not reduce to L2"):
        D.Dataset("toy", "ip", base=base, test=queries).to_l2()


def test_dataset_subset_and_checks():
    base = random_rows(np.float32, n=50)
    ds = D.Dataset("toy", "l2", base=base, test=base[:4], gt=np.zeros((4, 3), np.int32))
    first = ds.subset(10)
    assert first.name == "toy-first10" and first.gt is None
    np.testing.assert_array_equal(first.base, base[:10])
    a, b = ds.subset(10, seed=3), ds.subset(10, seed=3)
    np.testing.assert_array_equal(a.base, b.base)
    assert len({tuple(r) for r in a.base}) == 10
    with pytest.raises(ValueError, match=r"subset size must be in 1\.\.50"):
        ds.subset(51)
    with pytest.raises(ValueError, match="test has d=4 but base has d=5"):
        D.Dataset("bad", "l2", base=base, test=base[:, :4])
    with pytest.raises(ValueError, match="gt has 2 rows but test has 4"):
        D.Dataset("bad", "l2", base=base, test=base[:4], gt=np.zeros((2, 1)))


# ---------------------------------------------------------------- the shared real set
def test_shared_sift_photos_small(tmp_path):
    folder = SHARED_DATA / "sift-photos-128-small"
    if not folder.is_dir():
        pytest.skip(f"shared data set not present at {folder} (build it with "
                    f"../shared/data/fetch)")
    ds = D.load_dataset("sift-photos-128-small", data_dir=tmp_path)  # found in shared/
    meta = json.loads((folder / "meta.json").read_text())
    assert ds.metric == meta["metric"] == "l2"
    for part in ("base", "test", "learn", "gt"):
        array = getattr(ds, part)
        assert isinstance(array, np.memmap)
        assert list(array.shape) == meta["files"][f"{part}.npy"]["shape"]
        assert array.dtype == meta["files"][f"{part}.npy"]["dtype"]
    # faiss (float32) agrees with the stored exact neighbours on these integer vectors.
    ids = D.ground_truth(ds.base, ds.test[:200], 10, "l2", cache_dir=tmp_path)
    np.testing.assert_array_equal(ids, ds.gt[:200, :10])
