"""Data-parallel EM (torch.distributed, gloo, 2 processes) and sharded GMM-IVF indexes.

Multi-process jobs run through ``torch.multiprocessing`` on localhost; rank 0 saves what
it fitted and the tests compare it, in this process, with single-process results.
"""
import json
import math
import os
import shutil
import signal
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashgmm_ivf import GaussianMixture, GMMIndexIVF
from flashgmm_ivf._chunks import device_copy
from flashgmm_ivf.cli import main as cli_main
from flashgmm_ivf.distributed import (Checkpoint, DistributedGaussianMixture, ShardSource, _Comm, load_checkpoint,
                                      save_checkpoint, shard_range)
from flashgmm_ivf.ivf import read_index, write_index
from flashgmm_ivf.ivf.shards import (ShardedGMMIndex, build_shard, empty_copy, merge_shards, read_shard, to_gpu,
                                     write_shard)

WORLD = 2
K, D, N = 8, 16, 4000
KILL_AT = 3  # rank 1 dies right after this EM iteration
JOB_TIMEOUT_S = 90


def _data():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (6, D))
    return (centres[rng.integers(0, 6, N)] + rng.standard_normal((N, D))).astype(np.float32)


def _explicit_start(x):
    """Initial parameters with component 0 far from the data: it empties and is re-seeded."""
    means = x[np.random.default_rng(1).choice(N, K, replace=False)].astype(np.float64)
    means[0] = x.mean(0) + 1e3
    return dict(means_init=means, weights_init=np.full(K, 1 / K), precisions_init=np.ones((K, D)))


COMMON = dict(covariance_type="diag", device="cpu", compute_dtype="float64", chunk_size=700)
EXPLICIT = dict(COMMON, tol=1e-4, max_iter=60)                      # converges by tol (15 iterations)
KMEANS = dict(COMMON, tol=0.0, max_iter=6, random_state=3, init_params="kmeans")
INDEX = {"copies": 1.3, "nprobe": 3}


# ---------------------------------------------------------------------- multi-process harness
class _KilledAfter(DistributedGaussianMixture):
    """Rank 1 is SIGKILLed right after iteration KILL_AT; rank 0 may not have written that checkpoint yet."""

    def _m_step(self, *args):
        out = super()._m_step(*args)
        if self._comm.rank == 1 and self._progress.n_iter == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return out


class _DeviceCopied(DistributedGaussianMixture):
    """Fits from one copy of each rank's validated shard, re-blocked, as a CUDA fit does
    (``GaussianMixture._cached``), here in host memory so that CPU runs take that path."""

    def _fit(self, source):
        source.validate()
        return super()._fit(device_copy(source, torch.device("cpu"), math.inf, chunk_size=300))


def _job_fit(rank, world, tmp):
    x = np.load(tmp / "x.npy", mmap_mode="r")
    explicit = DistributedGaussianMixture(K, **EXPLICIT, **_explicit_start(x)).fit(x)
    start, stop = shard_range(N, rank, world)
    own = [np.array(x[i:min(i + 500, stop)]) for i in range(start, stop, 500)]  # this rank's "own file"
    streamed = DistributedGaussianMixture(K, **EXPLICIT, **_explicit_start(x)).fit_stream(own)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: never converges, by design
        kmeans = DistributedGaussianMixture(K, **KMEANS).fit(x)
        copied = _DeviceCopied(K, **KMEANS).fit(x)
    if rank == 0:
        copied.save(tmp / "copied.npz")
        explicit.save(tmp / "explicit.npz")
        streamed.save(tmp / "streamed.npz")
        kmeans.save(tmp / "kmeans.npz")
        trained = GMMIndexIVF(D, K, gmm=kmeans, **INDEX)
        trained.train(x)
        write_index(trained, tmp / "trained.npz")
    dist.barrier()
    write_shard(build_shard(read_index(tmp / "trained.npz"), x, rank, world), tmp / f"shard{rank}.faissindex")


def _job_killed(rank, world, tmp):
    x = np.load(tmp / "x.npy", mmap_mode="r")
    _KilledAfter(K, **EXPLICIT, **_explicit_start(x), checkpoint=tmp / "em.ckpt.npz").fit(x)


def _job_resume(rank, world, tmp):
    x = np.load(tmp / "x.npy", mmap_mode="r")
    gmm = DistributedGaussianMixture(K, **EXPLICIT, **_explicit_start(x), checkpoint=tmp / "em.ckpt.npz",
                                     resume=True).fit(x)
    if rank == 0:
        gmm.save(tmp / "resumed.npz")


_JOBS = {"fit": _job_fit, "killed": _job_killed, "resume": _job_resume}


def _worker(rank, world, port, job, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=JOB_TIMEOUT_S))
    try:
        _JOBS[job](rank, world, Path(tmp))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(job, tmp):
    """Run ``job`` on WORLD spawned processes; raise what a process raised, or on timeout."""
    ctx = mp.spawn(_worker, args=(WORLD, _free_port(), job, str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"job {job!r} ran past {JOB_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Folder holding the data and what the 'fit' job wrote (2 ranks)."""
    tmp = tmp_path_factory.mktemp("dist")
    np.save(tmp / "x.npy", _data())
    _run("fit", tmp)
    return tmp


def _assert_same_fit(got, want, rtol):
    assert got.n_iter_ == want.n_iter_
    assert got.converged_ == want.converged_
    assert got.n_reseeded_ == want.n_reseeded_
    np.testing.assert_allclose(got.means_, want.means_, rtol=rtol, atol=rtol * np.abs(want.means_).max())
    np.testing.assert_allclose(got.covariances_, want.covariances_, rtol=rtol)
    np.testing.assert_allclose(got.weights_, want.weights_, rtol=rtol)
    np.testing.assert_allclose(got.lower_bounds_, want.lower_bounds_, rtol=rtol)


# ---------------------------------------------------------------------- distributed EM
def test_distributed_fit_equals_single_process(job):
    x = np.load(job / "x.npy")
    single = GaussianMixture(K, **EXPLICIT, **_explicit_start(x)).fit(x)
    got = GaussianMixture.load(job / "explicit.npz")
    assert single.converged_ and single.n_iter_ < EXPLICIT["max_iter"]
    assert single.n_reseeded_ > 0  # the global choice of re-seeding rows is exercised
    _assert_same_fit(got, single, rtol=1e-6)


def test_fit_stream_of_own_rows_equals_fit(job):
    # Blocks of 500 rows instead of 700: only the order of the float64 sums differs.
    _assert_same_fit(GaussianMixture.load(job / "streamed.npz"), GaussianMixture.load(job / "explicit.npz"),
                     rtol=1e-9)


def test_kmeans_init_on_rank0_equals_single_process(job):
    # Rank 0 draws the same sample as one process with the same random_state, runs the same
    # faiss k-means, and broadcasts: the whole fit matches.
    x = np.load(job / "x.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = GaussianMixture(K, **KMEANS).fit(x)
    _assert_same_fit(GaussianMixture.load(job / "kmeans.npz"), single, rtol=1e-6)


def test_fit_from_device_copy_equals_fit(job):
    # A device copy of each shard (what every CUDA fit reads) keeps the global row count and
    # the rank's offset: initialisation and EM are those of the streamed fit (blocks of 300
    # rows instead of 700: only the order of the float64 sums differs).
    _assert_same_fit(GaussianMixture.load(job / "copied.npz"), GaussianMixture.load(job / "kmeans.npz"), rtol=1e-9)


def test_resume_after_killed_rank_gives_uninterrupted_result(job, tmp_path):
    np.save(tmp_path / "x.npy", np.load(job / "x.npy"))
    with pytest.raises(mp.ProcessExitedException):
        _run("killed", tmp_path)
    ckpt = load_checkpoint(tmp_path / "em.ckpt.npz")
    assert ckpt.n_iter in (KILL_AT - 1, KILL_AT)  # at most one iteration is lost
    assert len(ckpt.lower_bounds) == ckpt.n_iter
    _run("resume", tmp_path)
    _assert_same_fit(GaussianMixture.load(tmp_path / "resumed.npz"), GaussianMixture.load(job / "explicit.npz"),
                     rtol=1e-12)


# ---------------------------------------------------------------------- sharded index
@pytest.fixture(scope="module")
def single_index(job):
    x = np.load(job / "x.npy")
    index = GMMIndexIVF(D, K, gmm=GaussianMixture.load(job / "kmeans.npz"), **INDEX)
    index.train(x)
    index.add(x)
    assert index.copies_per_vector > 1.2  # duplicates are there to deduplicate
    return index


def _queries(job):
    return np.load(job / "x.npy")[::40] + 0.05


@pytest.mark.parametrize("how", ["merge_from", "ondisk", "ShardedGMMIndex"])
def test_sharded_index_search_equals_single_index(job, single_index, tmp_path, how):
    trained = read_index(job / "trained.npz")
    paths = [job / f"shard{r}.faissindex" for r in range(WORLD)]
    if how == "merge_from":
        index = merge_shards(trained, [read_shard(p, trained) for p in paths])
    elif how == "ondisk":
        index = merge_shards(trained, [read_shard(p, trained, mmap=True) for p in paths],
                             ondisk=tmp_path / "lists.ivfdata")
    else:
        index = ShardedGMMIndex([read_shard(p, trained) for p in paths])
    q = _queries(job)
    D, I = index.search(q, 10)
    D0, I0 = single_index.search(q, 10)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-6)
    assert all(len(set(row)) == 10 for row in I)
    assert index.ntotal == single_index.ntotal == N
    want = single_index.last_stats
    got = index.last_stats
    assert got == want
    if how != "ShardedGMMIndex":  # merged: the calibration queries' neighbours are the single index's too
        np.testing.assert_array_equal(index.calibration.ids, single_index.calibration.ids)
        np.testing.assert_array_equal(index.search(q, 10, recall=0.9)[1], single_index.search(q, 10, recall=0.9)[1])


@pytest.mark.gpu
def test_to_gpu_search_deduplicates_as_cpu(job, single_index):
    if not hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this FAISS build has no GPU support")
    q = _queries(job)
    D, I = to_gpu(single_index).search(q, 10)
    D0, I0 = single_index.search(q, 10)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_allclose(D, D0, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::flashgmm_ivf.ConvergenceWarning")
def test_read_shard_rejects_another_training(job, tmp_path):
    x = np.load(job / "x.npy")
    other = GMMIndexIVF(D, K, max_iter=2, random_state=9, device="cpu", **INDEX)
    other.train(x)
    with pytest.raises(ValueError, match="centroids differ"):
        read_shard(job / "shard0.faissindex", other)


def test_read_shard_refuses_a_damaged_faiss_file(job, single_index, tmp_path):
    shutil.copy(f"{job / 'shard0.faissindex'}.json", f"{tmp_path / 'shard0.faissindex'}.json")
    (tmp_path / "shard0.faissindex").write_bytes((job / "shard0.faissindex").read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="FAISS cannot read the shard"):
        read_shard(tmp_path / "shard0.faissindex", single_index)


def test_empty_copy_is_trained_and_empty(single_index):
    copy = empty_copy(single_index)
    assert copy.is_trained and copy.ntotal == 0 and copy.index.ntotal == 0
    assert single_index.index.ntotal > 0 and copy.gmm is single_index.gmm


# ---------------------------------------------------------------------- one process: checkpoints, CLI
def test_without_process_group_equals_gaussian_mixture():
    x = _data()
    a = GaussianMixture(K, **EXPLICIT, **_explicit_start(x)).fit(x)
    b = DistributedGaussianMixture(K, **EXPLICIT, **_explicit_start(x)).fit(x)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.lower_bounds_ == b.lower_bounds_
    assert b.get_params()["checkpoint"] is None and "resume" in b.get_params()


def test_device_copy_of_shard_keeps_global_rows():
    x = _data()
    source = ShardSource(x, 700, _Comm(), rows=(1000, 3000))
    assert source.validate() == 2000
    copied = device_copy(source, torch.device("cpu"), math.inf, chunk_size=512)
    assert type(copied) is ShardSource and copied.checked and copied.comm is source.comm
    assert (copied.n_total, copied.offset, copied.n_samples, copied.n_features) == (2000, 0, 2000, D)
    assert [len(block) for _, block in copied] == [512, 512, 512, 464]
    np.testing.assert_array_equal(np.concatenate([block.numpy() for _, block in copied]), x[1000:3000])


def test_one_process_fit_from_device_copy_equals_gaussian_mixture():
    x = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: never converges, by design
        single = GaussianMixture(K, **KMEANS).fit(x)
        copied = _DeviceCopied(K, **KMEANS).fit(x)
    _assert_same_fit(copied, single, rtol=1e-9)


def test_checkpoint_round_trip_and_errors(tmp_path):
    ckpt = Checkpoint(np.full(2, 0.5), np.zeros((2, 3)), np.ones((2, 3)), np.arange(3.0), "diag", 10, 4,
                      [-3.0, -2.5, -2.4, -2.4], 1, False)
    path = tmp_path / "c.npz"
    save_checkpoint(path, ckpt)
    back = load_checkpoint(path)
    assert (back.n_iter, back.lower_bounds, back.n_samples) == (4, ckpt.lower_bounds, 10)
    np.testing.assert_array_equal(back.shift, ckpt.shift)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.npz")


def test_resume_from_finished_checkpoint_does_not_iterate(tmp_path):
    x = _data()
    path = tmp_path / "c.npz"
    full = DistributedGaussianMixture(K, **EXPLICIT, **_explicit_start(x), checkpoint=path).fit(x)
    again = DistributedGaussianMixture(K, **EXPLICIT, checkpoint=path, resume=True)
    again._e_step = None  # would fail if called
    again.fit(x)
    np.testing.assert_array_equal(again.means_, full.means_)
    assert (again.n_iter_, again.converged_, again.lower_bounds_) == (full.n_iter_, True, full.lower_bounds_)


@pytest.mark.filterwarnings("ignore::flashgmm_ivf.ConvergenceWarning")
def test_resume_rejects_checkpoint_of_other_data(tmp_path):
    x = _data()
    path = tmp_path / "c.npz"
    DistributedGaussianMixture(K, **dict(EXPLICIT, max_iter=2), **_explicit_start(x), checkpoint=path).fit(x)
    with pytest.raises(ValueError, match="n_samples"):
        DistributedGaussianMixture(K, **EXPLICIT, checkpoint=path, resume=True).fit(x[:-1])


def test_checkpoint_needs_one_init(tmp_path):
    with pytest.raises(ValueError, match="n_init=1"):
        DistributedGaussianMixture(K, n_init=2, checkpoint=tmp_path / "c.npz", device="cpu").fit(_data())


def test_cli_train_one_process(tmp_path, capsys):
    np.save(tmp_path / "x.npy", _data())
    argv = ["train", "--data", str(tmp_path / "x.npy"), "-k", str(K), "--max-iter", "3", "--device", "cpu",
            "--checkpoint", str(tmp_path / "c.npz"), "--save", str(tmp_path / "gmm.npz"), "-v", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(argv) == 0
    assert "3 iterations" in capsys.readouterr().out
    assert GaussianMixture.load(tmp_path / "gmm.npz").n_iter_ == 3
    assert load_checkpoint(tmp_path / "c.npz").n_iter == 3


def test_bench_distributed_on_cpu_two_ranks(tmp_path):
    from flashgmm_ivf.eval import bench_distributed
    out = tmp_path / "d.json"
    bench_distributed.main(["--device", "cpu", "--n", "6000", "--d", "8", "--k", "4", "--iterations", "2",
                            "--block-rows", "1000", "--chunk-size", "1000", "--worlds", "2", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["environment"]["commit"] and doc["params"]["worlds"] == "2"
    single, two = doc["rows"]
    assert (single["backend"], two["backend"], two["world"]) == ("none", "gloo", 2)
    assert two["equal_to_single"] and max(two["max_relative_difference"].values()) < 1e-9
    assert not two["timing_is_scaling"]  # gloo on CPU cores: no scaling figure
    assert single["n_iter"] == two["n_iter"] == 3 and math.isfinite(two["seconds_per_iteration"] + two["fixed_seconds"])
