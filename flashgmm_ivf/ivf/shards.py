"""Sharded GMM-IVF indexes: ranks fill copies of one trained index; FAISS merges or searches the shards.

Flow on P ranks (or P jobs), over one trained index (the fitted GMM's means in the flat
quantizer, the encoder trained; written once with :func:`~flashgmm_ivf.ivf.write_index`)::

    trained = read_index("trained.npz")                     # every rank
    shard = build_shard(trained, x, rank, world_size)        # assigns and adds its rows
    write_shard(shard, f"shard{rank}.faissindex")            # plain FAISS file + JSON counters

    shards = [read_shard(p, trained) for p in paths]
    index = merge_shards(trained, shards)                    # IndexIVF.merge_from, in RAM
    index = merge_shards(trained, [read_shard(p, trained, mmap=True) for p in paths],
                         ondisk="lists.ivfdata")             # OnDiskInvertedLists: data > RAM
    index = ShardedGMMIndex(shards)                          # no merge: faiss.IndexShardsIVF

Ids are global row numbers, so one vector's copies (spilling) all live in one shard and
shards hold disjoint ids. That is what makes sharded search exact: the k nearest distinct
ids over all shards are the best k among every shard's k nearest distinct ids. The spill
budget (``copies``) is met on each added block of rows, so shards whose blocks start at
the same rows hold the single index's entries. Each shard keeps its calibration
queries' neighbours among its own rows; merging merges them.
"""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from .._validation import check_positive_int
from ..distributed import shard_range
from .calibration import Calibration
from .index import GMMIndexIVF
from .search import SearchStats, cosine_from_l2, ranked_lists, search_preassigned

__all__ = ["ShardedGMMIndex", "build_shard", "empty_copy", "merge_shards", "read_shard", "to_gpu", "write_shard"]

SHARD_FORMAT = "flashgmm_ivf.IVFShard"
SHARD_VERSION = 2


def empty_copy(index: GMMIndexIVF) -> GMMIndexIVF:
    """A trained, empty copy of ``index`` sharing its GMM (quantizer and encoder cloned, lists empty).

    Clone the trained index before adding to it: FAISS's ``clone_index`` copies the lists too.
    """
    if not index.is_trained:
        raise ValueError("the index is not trained: train it (GMM and encoder) before sharding")
    inner = faiss.clone_index(index.index)
    inner.reset()
    return _wrap(index, inner, n_vectors=0, next_id=0, max_dup=1)


def build_shard(trained: GMMIndexIVF, x, rank: int, world_size: int, *, chunk_size: int = 65536) -> GMMIndexIVF:
    """This rank's shard: rows ``shard_range(n, rank, world_size)`` of x, assigned and added.

    Parameters
    ----------
    trained : GMMIndexIVF, trained (its lists are not touched)
    x : array-like of shape (n, d): ndarray, np.memmap, h5py dataset (read ``chunk_size`` rows at a time)
    rank, world_size : int
    chunk_size : int

    Returns
    -------
    GMMIndexIVF holding rows [start, stop) with their global row numbers as ids.
    """
    start, stop = shard_range(int(x.shape[0]), rank, world_size)
    shard = empty_copy(trained)
    for i in range(start, stop, chunk_size):
        j = min(i + chunk_size, stop)
        shard.add_with_ids(x[i:j], np.arange(i, j, dtype=np.int64))
    return shard


def write_shard(shard: GMMIndexIVF, path) -> None:
    """Write the shard's inverted lists as a plain FAISS file at ``path`` and its counters to ``path.json``.

    The FAISS file is what ``faiss.read_index`` reads (memory-mapped with ``IO_FLAG_MMAP``
    by :func:`read_shard`); the GMM is not repeated: it is the trained index's. The JSON
    holds the counters and the calibration queries' neighbours among the shard's rows.
    """
    faiss.write_index(shard.index, str(path))
    cal = shard.calibration
    header = {"format": SHARD_FORMAT, "format_version": SHARD_VERSION, "d": shard.d, "nlist": shard.nlist,
              "faiss_class": type(shard.index).__name__, "n_entries": int(shard.index.ntotal),
              "n_vectors": shard.ntotal, "next_id": shard._next_id, "max_dup": shard._max_dup,
              # the calibration queries' neighbours among this shard's rows (merged by merge_shards)
              "calibration_ids": cal.ids.tolist(), "calibration_distances": cal.distances.tolist(),
              "calibration_self_pending": cal.self_pending.tolist()}
    Path(f"{path}.json").write_text(json.dumps(header))


def read_shard(path, trained: GMMIndexIVF, *, mmap: bool = False) -> GMMIndexIVF:
    """Read a shard written by :func:`write_shard`, checked against the trained index it was built from.

    Parameters
    ----------
    path : str or Path
    trained : GMMIndexIVF
    mmap : bool
        Memory-map the lists (``faiss.IO_FLAG_MMAP``) instead of reading them: for
        :func:`merge_shards` with ``ondisk`` when the shards exceed RAM.

    Raises
    ------
    ValueError naming the file when the counters are malformed or the shard does not
    belong to ``trained`` (other class, shape or centroids).
    """
    try:
        header = json.loads(Path(f"{path}.json").read_text())
        if header.get("format") != SHARD_FORMAT or header.get("format_version") != SHARD_VERSION:
            raise ValueError(f"format {header.get('format')!r} version {header.get('format_version')!r}, "
                             f"expected {SHARD_FORMAT!r} version {SHARD_VERSION}")
        counters = {key: int(header[key]) for key in ("n_vectors", "next_id", "max_dup", "n_entries")}
        neighbours = (np.array(header["calibration_ids"], np.int64),
                      np.array(header["calibration_distances"], np.float32),
                      np.array(header["calibration_self_pending"], bool))
        if any(a.shape[:1] != trained.calibration.ids.shape[:1] for a in neighbours) \
                or neighbours[0].shape != neighbours[1].shape:
            raise ValueError("calibration arrays do not match the trained index's calibration queries")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}.json: not a readable shard header: {err}") from err
    try:
        inner = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
    except (RuntimeError, MemoryError) as err:  # a damaged or truncated FAISS file (MemoryError: a damaged size)
        raise ValueError(f"{path}: FAISS cannot read the shard: {str(err).strip() or type(err).__name__}") from err
    if int(inner.ntotal) != counters.pop("n_entries"):
        raise ValueError(f"{path}: holds {inner.ntotal} entries, its header says {header['n_entries']}")
    _check_same_training(trained.index, inner, path)
    shard = _wrap(trained, inner, **counters)
    shard.calibration.ids, shard.calibration.distances, shard.calibration.self_pending = neighbours
    return shard


def merge_shards(trained: GMMIndexIVF, shards, *, ondisk=None) -> GMMIndexIVF:
    """One index holding every shard's entries, merged by FAISS.

    Parameters
    ----------
    trained : GMMIndexIVF, trained (its lists are not touched)
    shards : list of GMMIndexIVF from :func:`build_shard` / :func:`read_shard`, disjoint ids
    ondisk : str or Path, optional
        None: ``IndexIVF.merge_from`` in RAM (it moves the entries: the shards are left
        empty). A path: the lists are written there as ``faiss.OnDiskInvertedLists``
        (``merge_from_multiple``, as ``faiss.contrib.ondisk.merge_ondisk``), so shards read
        with ``mmap=True`` can exceed RAM; the returned index reads its lists from that file.

    Returns
    -------
    GMMIndexIVF
    """
    shards = list(shards)
    merged = empty_copy(trained)
    for shard in shards:
        _check_same_training(trained.index, shard.index, "shard")
    if ondisk is None:
        for shard in shards:
            merged.index.merge_from(shard.index, 0)
    else:
        invlists = faiss.OnDiskInvertedLists(merged.nlist, merged.index.code_size, str(ondisk))
        pointers = faiss.InvertedListsPtrVector()
        for shard in shards:
            pointers.push_back(shard.index.invlists)
        merged.index.ntotal = invlists.merge_from_multiple(pointers.data(), pointers.size(), False)
        merged.index.replace_invlists(invlists, True)
        invlists.this.disown()  # the index owns it now
    for shard in shards:
        merged.calibration.merge(shard.calibration)
    merged._ntotal = sum(s.ntotal for s in shards)
    merged._next_id = max([s._next_id for s in shards], default=0)
    merged._max_dup = max([s._max_dup for s in shards], default=1)
    return merged


class ShardedGMMIndex:
    """Search over shards without merging them: one coarse step, every shard scanned, results merged.

    The shards share the partition and the quantizer, so each query's lists are ranked
    once (the first shard's quantizer) and every shard's ``search_preassigned`` scans those
    lists. The results are deduplicated by id, counted as :meth:`GMMIndexIVF.search`
    counts, and equal the merged index's at the same nprobe. A recall target needs the
    depth table of the whole index: merge the shards (:func:`merge_shards`) for that.

    Parameters
    ----------
    shards : list of GMMIndexIVF (same trained index, disjoint ids); they stay owned by the caller
    nprobe : int, optional, default: the first shard's

    Attributes
    ----------
    last_stats : SearchStats or None
    """

    def __init__(self, shards, *, nprobe=None):
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("no shards given")
        first = self.shards[0]
        for shard in self.shards[1:]:
            _check_same_training(first.index, shard.index, "shard")
        self.nprobe = first.nprobe if nprobe is None else check_positive_int(nprobe, "nprobe")
        self.last_stats = None

    @property
    def ntotal(self) -> int:
        """Vectors over all shards (each counted once, whatever its copies)."""
        return sum(s.ntotal for s in self.shards)

    def search(self, x, k, *, nprobe=None):
        """k nearest neighbours with distinct ids over all shards, probing ``nprobe`` lists per query.

        Returns
        -------
        D : ndarray of shape (nq, k), float32
        I : ndarray of shape (nq, k), int64, -1 padded
        """
        first = self.shards[0]
        x = first._vectors(x, "x")
        k = check_positive_int(k, "k")
        nprobe = check_positive_int(self.nprobe if nprobe is None else nprobe, "nprobe")
        if nprobe > first.nlist:
            raise ValueError(f"nprobe must be <= nlist={first.nlist}, got {nprobe}")
        coarse_dis, list_nos, evaluations = ranked_lists(first.index, x, nprobe)
        counts = [SearchStats() for _ in self.shards]
        parts = [search_preassigned(s.index, x, k, list_nos, coarse_dis, max_dup=s._max_dup, stats=c)
                 for s, c in zip(self.shards, counts)]
        D, I = faiss.merge_knn_results(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                                       keep_max=first.index.metric_type == faiss.METRIC_INNER_PRODUCT)
        # One coarse step and one set of lists per query; every shard scanned its part of them.
        self.last_stats = SearchStats(len(x), sum(c.ndis for c in counts), evaluations, counts[0].nlists,
                                      sum(c.n_refetch for c in counts))
        if first.metric == "cosine":
            cosine_from_l2(D, I)
        return D, I


def to_gpu(index: GMMIndexIVF, device: int = 0, resources=None) -> GMMIndexIVF:
    """A GMMIndexIVF whose inner IVF index lives on a GPU (``faiss.index_cpu_to_gpu``); the GMM is shared.

    Search keeps its deduplication (done on the host over the GPU's over-fetched results).

    Parameters
    ----------
    index : GMMIndexIVF (CPU)
    device : int, GPU number
    resources : faiss.StandardGpuResources, optional (one is made and kept alive with the index)

    Notes
    -----
    FAISS GPU indexes do not update ``faiss.cvar.indexIVF_stats``, so ``last_stats.ndis``
    of a GPU search reads 0; count scanned codes on the CPU index. GPU IVF search takes
    k <= 2048, which bounds ``k * max_copies``.
    """
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError("this FAISS build has no GPU support (install faiss-gpu to use to_gpu)")
    resources = resources or faiss.StandardGpuResources()
    gpu = _wrap(index, faiss.index_cpu_to_gpu(resources, device, index.index), n_vectors=index.ntotal,
                next_id=index._next_id, max_dup=index._max_dup)
    gpu._gpu_resources = resources
    return gpu


# ---------------------------------------------------------------------- helpers
def _wrap(like: GMMIndexIVF, inner, *, n_vectors, next_id, max_dup) -> GMMIndexIVF:
    """A GMMIndexIVF with ``like``'s settings and GMM around the FAISS index ``inner``."""
    out = GMMIndexIVF(like.d, like.nlist, like.encoding, like.metric, **like.settings(), gmm=like.gmm)
    out.gmm_params = dict(like.gmm_params)
    out.spill_threshold = like.spill_threshold
    out.index = inner
    out.index.nprobe = out.nprobe
    if like.calibration is not None:
        out.calibration = Calibration.empty(like.calibration.queries, like.calibration.metric_type,
                                            like.calibration.source)
        out.calibration.self_pending[:] = like.calibration.self_pending
    out._ntotal, out._next_id, out._max_dup = n_vectors, next_id, max_dup
    return out


def _check_same_training(reference, other, where):
    """Both FAISS IVF indexes come from one training: class, shape, metric, code size and centroids."""
    same = (type(other) is type(reference) and other.d == reference.d and other.nlist == reference.nlist
            and other.metric_type == reference.metric_type and other.code_size == reference.code_size)
    if not same:
        raise ValueError(f"{where}: {type(other).__name__}(d={other.d}, nlist={other.nlist}) does not match the "
                         f"trained {type(reference).__name__}(d={reference.d}, nlist={reference.nlist})")
    centroids = [faiss.downcast_index(i.quantizer).reconstruct_n(0, i.nlist) for i in (reference, other)]
    if not np.array_equal(*centroids):
        raise ValueError(f"{where}: its quantizer's centroids differ from the trained index's (another training?)")
