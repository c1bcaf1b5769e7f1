"""GMM-IVF: exactness at nprobe = nlist, dedup, residual-correct PQ/SQ, soft assignment, files, bad input.

Real data from ../shared/data (skipped with a reason when absent), subsampled and with
few EM iterations so the module runs in well under a minute on 2 CPU cores.
"""
import json
import warnings
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest
from faiss.contrib.ivf_tools import search_preassigned

from flashgmm_ivf import GaussianMixture
from flashgmm_ivf.ivf import (GMMIndexIVF, TopComponents, assign_budget, assign_tau, dedup_results, index_factory,
                              read_index, soft_assign, write_index)
from flashgmm_ivf.ivf.quantizer import coarse_distances, posterior_lists

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
K = 10


def load(name, n_base, n_query):
    folder = DATA / name
    if not (folder / "base.npy").exists():
        pytest.skip(f"shared data set {folder} is absent (see ../shared/data/fetch)")
    meta = json.loads((folder / "meta.json").read_text())
    base = np.load(folder / "base.npy", allow_pickle=False)[:n_base].astype(np.float32)
    query = np.load(folder / "test.npy", allow_pickle=False)[:n_query].astype(np.float32)
    return base, query, ("cosine" if meta["metric"] == "angular" else "l2")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the short EM runs
        yield


@pytest.fixture(scope="module")
def fashion():
    return load("fashion-mnist-784-small", 4000, 100)


@pytest.fixture(scope="module")
def glove():
    return load("glove-6B-50d-small", 8000, 200)


def build(description, data, **kwargs):
    base, _, metric = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = index_factory(base.shape[1], description, metric, device="cpu", **kwargs)
        index.train(base)
        index.add(base)
    return index


@pytest.fixture(scope="module")
def fashion_index(fashion):
    return build("IVF32_GMM(spherical,iter=5),Flat", fashion)


@pytest.fixture(scope="module")
def glove_index(glove):
    return build("IVF64_GMM(diag,iter=5,copies=1.5),Flat", glove)


def exact(base, query, metric, k):
    """Exact top-k (FAISS flat index), and float64 distances of any ids to their queries."""
    if metric == "cosine":
        base, query = base / np.linalg.norm(base, axis=1, keepdims=True), query / np.linalg.norm(query, axis=1,
                                                                                                  keepdims=True)
        flat = faiss.IndexFlatIP(base.shape[1])
    else:
        flat = faiss.IndexFlatL2(base.shape[1])
    flat.add(np.ascontiguousarray(base, dtype=np.float32))
    D, I = flat.search(np.ascontiguousarray(query, dtype=np.float32), k)

    def true_distances(ids):
        b, q = base[ids].astype(np.float64), query[:, None, :].astype(np.float64)
        return (b * q).sum(2) if metric == "cosine" else ((b - q) ** 2).sum(2)
    return D, I, true_distances


def assert_no_duplicates(I):
    for row in I:
        found = row[row >= 0]
        assert len(found) == len(set(found.tolist())), f"duplicate id in row {row}"


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("which", ["fashion", "glove"])
@pytest.mark.parametrize("probe", ["centroid", "posterior"])
def test_full_probe_equals_exact_search(which, probe, request):
    data = request.getfixturevalue(which)
    index = request.getfixturevalue(f"{which}_index")
    base, query, metric = data
    assert index.copies_per_vector > 1.0 or which == "fashion"
    D, I = index.search(query, K, nprobe=index.nlist, probe=probe)
    D_ref, I_ref, true_distances = exact(base, query, metric, K)
    assert_no_duplicates(I)
    assert (I >= 0).all()
    # Each returned id carries its own true distance ...
    np.testing.assert_allclose(D, true_distances(I), rtol=1e-4, atol=1e-4)
    # ... and the rows are the exact top k (ids may swap only inside float ties).
    np.testing.assert_allclose(D, D_ref, rtol=1e-4, atol=1e-4)
    assert (I == I_ref).mean() > 0.995
    stats = index.last_stats
    assert stats.nq == len(query) and stats.nprobe == index.nlist
    assert stats.ndis == len(query) * index.index.ntotal  # every copy scanned, duplicates counted
    # K centroid evaluations per query; posterior probing adds nprobe true distances.
    per_query = index.nlist if probe == "centroid" else index.nlist + index.nlist
    assert stats.ncoarse == len(query) * per_query


def test_soft_assignment_has_copies_and_dedups(glove_index, glove):
    _, query, _ = glove
    assert abs(glove_index.copies_per_vector - 1.5) < 0.01
    for nprobe in (1, 4, 16):
        D, I = glove_index.search(query, 50, nprobe=nprobe)
        assert_no_duplicates(I)
        assert (np.diff(D, axis=1) <= 1e-6).all()  # inner product: best (largest) first
    # The raw FAISS index does hold repeated ids (what plain FAISS users see when
    # several lists of one vector are probed).
    unit = np.ascontiguousarray(query / np.linalg.norm(query, axis=1, keepdims=True))
    _, raw = glove_index.index.search(unit, 50, params=faiss.SearchParametersIVF(nprobe=16))
    assert any(len(set(r.tolist())) < len(r) for r in raw)


def test_padding_only_when_lists_hold_fewer(fashion):
    base, query, _ = fashion
    index = index_factory(base.shape[1], "IVF8_GMM(spherical,iter=3,copies=2.0,max_copies=2),Flat", device="cpu")
    index.train(base)
    index.add(base[:30])
    D, I = index.search(query[:5], 40, nprobe=8)
    assert ((I >= 0).sum(1) == 30).all()  # all 30 vectors, each once, then padding
    assert (I[:, 30:] == -1).all() and (D[:, 30:] == np.finfo(np.float32).max).all()
    assert_no_duplicates(I)


def test_refetch_when_ids_repeat_across_adds(fashion):
    """An id added more often than max_copies (here 3 adds, hard assignment) still gives k unique ids."""
    base, query, _ = fashion
    index = index_factory(base.shape[1], "IVF8_GMM(spherical,iter=3,max_copies=1),Flat", device="cpu")
    index.train(base)
    for _ in range(3):
        index.add_with_ids(base[:500], np.arange(500))
    D, I = index.search(query[:10], 20, nprobe=8)
    assert (I >= 0).all()
    assert_no_duplicates(I)
    assert index.last_stats.n_refetch > 0
    D_ref, I_ref, _ = exact(base[:500], query[:10], "l2", 20)
    np.testing.assert_allclose(D, D_ref, rtol=1e-4)


def test_dedup_results_unit():
    D = np.array([[1, 1, 2, 3, 3, 4]], dtype=np.float32)
    I = np.array([[7, 7, 5, 7, 9, -1]])
    Dk, Ik, count = dedup_results(D, I, 4)
    assert Ik.tolist() == [[7, 5, 9, -1]] and count.tolist() == [3]
    assert Dk[0, :3].tolist() == [1, 2, 3] and Dk[0, 3] == np.finfo(np.float32).max
    _, _, count = dedup_results(D, I, 2)
    assert count.tolist() == [2]
    Dk, _, _ = dedup_results(-D, I, 4, faiss.METRIC_INNER_PRODUCT)
    assert Dk[0, 3] == -np.finfo(np.float32).max


# ---------------------------------------------------------------------- residual encodings
def test_ivfpq_hard_assignment_equals_faiss_ivfpq(fashion):
    """Same quantizer, same trained PQ, same partition: our search = FAISS's own IVFPQ search."""
    base, query, _ = fashion
    index = build("IVF32_GMM(spherical,iter=5,max_copies=1),PQ16x4", fashion)
    reference = faiss.clone_index(index.index)
    reference.reset()
    lists = index.gmm.predict(base).astype(np.int64)  # the GMM partition (primary lists)
    ids = np.arange(len(base), dtype=np.int64)
    reference.add_core(len(base), faiss.swig_ptr(base), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    assert reference.ntotal == index.index.ntotal == len(base)
    for nprobe in (1, 4, 32):
        reference.nprobe = nprobe
        D_ref, I_ref = reference.search(query, K)
        D, I = index.search(query, K, nprobe=nprobe, probe="centroid")
        np.testing.assert_array_equal(I, I_ref)
        np.testing.assert_array_equal(D, D_ref)
        # Posterior probing: FAISS's search_preassigned with the same lists and the TRUE
        # distances to the means (term 1 of the PQ distance) gives the same answer.
        lists_q = posterior_lists(index.gmm, query, nprobe)
        D, I = index.search(query, K, nprobe=nprobe, probe="posterior")
        reference.nprobe = nprobe
        D_pre, I_pre = search_preassigned(reference, query, K, lists_q, coarse_distances(reference, query, lists_q))
        np.testing.assert_array_equal(I, I_pre)
        np.testing.assert_array_equal(D, D_pre)
    # And the true coarse distance matters: zeros instead change the PQ distances.
    D_zero, _ = search_preassigned(reference, query, K, lists_q)
    assert not np.allclose(D_zero, D_pre)
    # Each PQ distance is the distance to that vector's decoding, mean + decoded residual.
    reference.make_direct_map()
    decoded = reference.reconstruct_batch(I.ravel()).reshape(*I.shape, -1).astype(np.float64)
    expected = ((decoded - query[:, None, :].astype(np.float64)) ** 2).sum(2)
    np.testing.assert_allclose(D, expected, rtol=1e-3)


def test_ivfpq_soft_assignment_full_probe(fashion):
    base, query, _ = fashion
    index = build("IVF32_GMM(spherical,iter=5,copies=1.5),PQ16x4", fashion)
    D, I = index.search(query, K, nprobe=32)
    assert_no_duplicates(I)
    _, I_ref, _ = exact(base, query, "l2", K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(I, I_ref)])
    assert recall > 0.3


@pytest.mark.parametrize("which", ["fashion", "glove"])
def test_ivfsq_beats_random_partition(which, request):
    base, query, metric = request.getfixturevalue(which)
    index = build("IVF32_GMM(diag,iter=5,copies=1.3),SQ8", (base, query, metric))
    nprobe = 2
    D, I = index.search(query, K, nprobe=nprobe)
    assert_no_duplicates(I)
    _, I_ref, _ = exact(base, query, metric, K)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(I, I_ref)])
    # Random partition, same quantizer and SQ codec, same average copies: probing 2 of 32
    # lists then finds ~2/32 of the neighbours.
    rand = faiss.clone_index(index.index)
    rand.reset()
    rng = np.random.default_rng(0)
    x = base if metric == "l2" else base / np.linalg.norm(base, axis=1, keepdims=True)
    x = np.ascontiguousarray(x, dtype=np.float32)
    lists = rng.integers(0, 32, len(base)).astype(np.int64)
    ids = np.arange(len(base), dtype=np.int64)
    rand.add_core(len(base), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    rand.nprobe = nprobe
    q = query if metric == "l2" else query / np.linalg.norm(query, axis=1, keepdims=True)
    _, I_rand = rand.search(np.ascontiguousarray(q, dtype=np.float32), K)
    recall_rand = np.mean([len(set(a) & set(b)) / K for a, b in zip(I_rand, I_ref)])
    assert recall > recall_rand + 0.2, (recall, recall_rand)


# ---------------------------------------------------------------------- soft assignment
def test_budget_hits_target_copies(fashion):
    base, _, _ = fashion
    gmm = GaussianMixture(32, covariance_type="spherical", max_iter=5, random_state=0, device="cpu").fit(base)
    for target in (1.3, 1.5, 2.0):
        a = soft_assign(gmm, base, copies=target, max_copies=4)
        assert abs(a.copies_per_vector - target) <= 0.02 * target
        assert (a.lists[:, 0] == gmm.predict(base)).mean() > 0.99  # primary = most probable
        keep = a.lists >= 0
        assert (keep[:, :-1] >= keep[:, 1:]).all()  # copies are a prefix of the ranking


def test_tau_policy_and_temperature(fashion):
    base, _, _ = fashion
    gmm = GaussianMixture(32, covariance_type="spherical", max_iter=5, random_state=0, device="cpu").fit(base)
    cold = soft_assign(gmm, base, max_copies=4)  # tau = 1/K
    warm = soft_assign(gmm, base, max_copies=4, temperature=50.0)
    assert cold.policy == "tau" and np.isclose(cold.log_tau, -np.log(32))
    assert 1.0 <= cold.copies_per_vector < warm.copies_per_vector <= 4.0
    assert soft_assign(gmm, base, tau=1.0).copies_per_vector == 1.0
    assert soft_assign(gmm, base, tau=0.0, max_copies=3).copies_per_vector == 3.0


def test_budget_survives_underflow():
    """Gaps of hundreds of nats (responsibilities that underflow float32) still meet a budget."""
    rng = np.random.default_rng(0)
    n, m = 10000, 4
    gaps = np.cumsum(rng.uniform(200, 900, (n, m - 1)), axis=1)
    log_resp = np.hstack([np.zeros((n, 1)), -gaps])
    assert (np.exp(log_resp[:, 1:].astype(np.float32)) == 0).all()
    top = TopComponents(np.tile(np.arange(m), (n, 1)), log_resp, 1.0, 256)
    assert assign_tau(top).copies_per_vector == 1.0  # tau = 1/K: nothing passes
    for target in (1.3, 1.5, 2.0, 3.0):
        a = assign_budget(top, target)
        assert abs(a.copies_per_vector - target) < 1e-3 and a.delta > 200


# ---------------------------------------------------------------------- files
def test_save_load_bit_identical(glove_index, glove, tmp_path):
    _, query, _ = glove
    path = tmp_path / "index.npz"
    write_index(glove_index, path)
    loaded = read_index(path)
    assert loaded.ntotal == glove_index.ntotal and loaded.copies == glove_index.copies
    for probe in ("centroid", "posterior"):
        D0, I0 = glove_index.search(query, K, nprobe=8, probe=probe)
        D1, I1 = loaded.search(query, K, nprobe=8, probe=probe)
        np.testing.assert_array_equal(I0, I1)
        np.testing.assert_array_equal(D0, D1)
    # The inner index alone is a plain FAISS file.
    faiss.write_index(glove_index.index, str(tmp_path / "plain.faiss"))
    plain = faiss.read_index(str(tmp_path / "plain.faiss"))
    assert plain.ntotal == glove_index.index.ntotal


def test_corrupt_and_truncated_files(glove_index, tmp_path):
    path = tmp_path / "index.npz"
    write_index(glove_index, path)
    blob = path.read_bytes()
    cases = {"truncated": blob[: len(blob) // 2], "empty": b"", "garbage": b"not an index" * 100}
    flipped = bytearray(blob)
    flipped[len(blob) // 3] ^= 0xFF  # inside the FAISS payload
    cases["flipped"] = bytes(flipped)
    for name, content in cases.items():
        bad = tmp_path / f"{name}.npz"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=name):
            read_index(bad)
    # A valid npz of another format, and a newer format version.
    other = tmp_path / "other.npz"
    np.savez(other, header=np.array(json.dumps({"format": "something else"})))
    with pytest.raises(ValueError, match="other"):
        read_index(other)
    with zipfile.ZipFile(path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    header = json.loads(str(np.load(path)["header"]))
    header["format_version"] = 99
    newer = tmp_path / "newer.npz"
    with np.load(path) as npz:
        np.savez(newer, header=np.array(json.dumps(header)), faiss_index=npz["faiss_index"], gmm=npz["gmm"])
    with pytest.raises(ValueError, match="format_version 99"):
        read_index(newer)
    assert "header.npy" in members
    with pytest.raises(FileNotFoundError):
        read_index(tmp_path / "missing.npz")


# ---------------------------------------------------------------------- API and bad input
def test_factory_and_api(fashion):
    base, _, _ = fashion
    index = index_factory(784, "IVF16_GMM(diag, tau=0.01, max_copies=3, probe=posterior, iter=3, T=2),SQ8",
                          nprobe=4, device="cpu")
    assert isinstance(index.index, faiss.IndexIVFScalarQuantizer)
    assert (index.d, index.nlist, index.nprobe, index.ntotal) == (784, 16, 4, 0)
    assert (index.tau, index.max_copies, index.probe, index.temperature) == (0.01, 3, "posterior", 2.0)
    assert index.gmm.covariance_type == "diag" and index.gmm.max_iter == 3
    assert not index.is_trained
    index.train(base[:1000])
    index.add(base[:1000])
    index.add_with_ids(base[1000:1100], np.arange(10**6, 10**6 + 100))
    assert index.ntotal == 1100 and index.index.ntotal >= 1100
    mem = index.memory_usage()
    assert mem["n_entries"] == index.index.ntotal and mem["total_bytes"] > mem["code_bytes"] > 0
    _, I = index.search(base[1000:1005], 1, nprobe=16)
    assert (I[:, 0] == np.arange(10**6, 10**6 + 5)).all()
    index.nprobe = 16
    assert index.index.nprobe == 16
    D, I = index.search(base[:0], 3)
    assert D.shape == I.shape == (0, 3)
    assert index.assign(base[:50]).lists.shape == (50, 3)
    ip = index_factory(50, "IVF8_GMM(spherical),Flat", faiss.METRIC_INNER_PRODUCT)
    assert ip.metric == "ip" and ip.index.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    assert ip.index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.index.quantizer.metric_type == faiss.METRIC_L2


@pytest.mark.parametrize("description, match", [
    ("IVF16,Flat", "IVF<nlist>_GMM"),
    ("IVF16_GMM(sphere),Flat", "unknown option"),
    ("IVF16_GMM(diag,foo=1),Flat", "unknown option"),
    ("IVF16_GMM(diag,tau=x),Flat", "bad value"),
    ("IVF16_GMM(diag),PQ16x4fs", "supported"),
    ("IVF16_GMM(diag),Nonsense", "FAISS cannot build"),
    ("IVF16_GMM(tau=0.1,copies=1.5),Flat", "either tau"),
    ("IVF16_GMM(copies=5),Flat", "copies must be"),
    ("IVF16_GMM(nprobe=17),Flat", "nprobe must be <= nlist"),
])
def test_factory_errors(description, match):
    with pytest.raises(ValueError, match=match):
        index_factory(32, description)


def test_bad_input(fashion, fashion_index):
    base, query, _ = fashion
    fresh = index_factory(784, "IVF16_GMM(spherical,iter=2),Flat", device="cpu")
    with pytest.raises(ValueError, match="not trained"):
        fresh.search(query, K)
    with pytest.raises(ValueError, match="not trained"):
        fresh.add(base)
    with pytest.raises(ValueError, match="dimension 783"):
        fresh.train(base[:, :783])
    fresh.train(base[:1000])
    with pytest.raises(ValueError, match="empty"):
        fresh.search(query, K)
    index = fashion_index
    with pytest.raises(ValueError, match="dimension 10"):
        index.search(query[:, :10], K)
    with pytest.raises(ValueError, match="dimension 10"):
        index.add(base[:5, :10])
    with pytest.raises(ValueError, match="2-D"):
        index.search(query[0], K)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be >= 1"):
            index.search(query, k)
    with pytest.raises(TypeError, match="k must be an integer"):
        index.search(query, 2.5)
    for nprobe in (0, -1):
        with pytest.raises(ValueError, match="nprobe must be >= 1"):
            index.search(query, K, nprobe=nprobe)
    with pytest.raises(ValueError, match="nprobe must be <= nlist=32"):
        index.search(query, K, nprobe=33)
    with pytest.raises(ValueError, match="nprobe must be <= nlist"):
        index.nprobe = 33
    bad = query.copy()
    bad[[3, 7], 5] = np.nan
    with pytest.raises(ValueError, match="2 row.*first is row 3"):
        index.search(bad, K)
    with pytest.raises(ValueError, match="probe must be"):
        index.search(query, K, probe="nearest")
    with pytest.raises(TypeError, match="real numbers"):
        index.search(np.array([["a"] * 784]), K)
    with pytest.raises(ValueError, match="1 negative, first at position 1"):
        index.add_with_ids(base[:3], np.array([0, -2, 5]))
    with pytest.raises(ValueError, match="ids must have shape"):
        index.add_with_ids(base[:3], np.arange(4))
    with pytest.raises(ValueError, match="zero row"):
        cos = index_factory(784, "IVF16_GMM(spherical,iter=2),Flat", "cosine", device="cpu")
        cos.train(np.vstack([base[:1000], np.zeros((1, 784), np.float32)]))
    with pytest.raises(ValueError, match="metric must be"):
        GMMIndexIVF(8, 4, metric="hamming")
