"""GMMIndexIVF files: a versioned JSON header and plain arrays in one .npz, one SHA-256 over all of it.

Members (read with ``np.load(..., allow_pickle=False)``; nothing is pickled):

- ``header``: JSON: format name and version, the index's settings (d, nlist, encoding,
  metric, recipe options, nprobe, recall), the spill threshold, counters (ntotal, next id,
  copies), where the calibration came from.
- ``faiss_index``: uint8, ``faiss.serialize_index`` of the inner IndexIVF with its
  quantizer (an HNSW graph or projected ranking included): what ``faiss.write_index`` would write.
- ``gmm``: uint8, the GaussianMixture's own file (``GaussianMixture.save``).
- ``calibration_queries``, ``calibration_ids``, ``calibration_distances``,
  ``calibration_self_pending``: the calibration queries and their exact neighbours.
- ``table_edges``, ``table_recall``, ``table_cost``, ``table_counts``, ``table_widths``,
  ``table_bins``, ``table_range``: the fitted depth tables, one per first-walk width, stacked
  along their bins (``table_bins`` bins each; ``table_range`` one (low, high) row each; empty
  arrays when none is fitted). Version 3 files have no ``table_range`` and read as unbounded.
- ``sha256``: SHA-256 over the header's bytes and every other member's name, dtype,
  shape and bytes, so editing any of them (``next_id`` in the header, say) fails the load.

Loading checks the zip, the checksum, the header, and that the FAISS index, the GMM and
the calibration agree with the header and with each other. Any failure is a ValueError
naming the file; search results after loading are bit-identical.
"""
from __future__ import annotations

import io
import json

import faiss
import numpy as np

from .._io import READ_ERRORS, checksum
from ..mixture import GaussianMixture
from .calibration import K_CAL, Calibration
from .coarse import means_index
from .index import GMMIndexIVF, stored_ids
from .probing import ProbeTable, ProbeTables
from .quantizer import SUPPORTED_IVF

__all__ = ["write_index", "read_index", "FORMAT", "FORMAT_VERSION", "FILE_ARRAYS"]

FORMAT = "flashgmm_ivf.GMMIndexIVF"
FORMAT_VERSION = 4
_TABLE = ("table_edges", "table_recall", "table_cost", "table_counts", "table_widths", "table_bins")
_CALIBRATION = ("calibration_queries", "calibration_ids", "calibration_distances", "calibration_self_pending")
# Members the SHA-256 covers after the header, in this order.
FILE_ARRAYS = ("faiss_index", "gmm") + _CALIBRATION + _TABLE + ("table_range",)
# Members of every version read: version 3 had no table_range.
_VERSION_ARRAYS = {3: FILE_ARRAYS[:-1], FORMAT_VERSION: FILE_ARRAYS}


def write_index(index: GMMIndexIVF, path) -> None:
    """Write a trained GMMIndexIVF to ``path`` (an .npz; see the module docstring)."""
    if not isinstance(index, GMMIndexIVF):
        raise TypeError(f"write_index takes a GMMIndexIVF, got {type(index).__name__} "
                        "(for a plain FAISS index use faiss.write_index)")
    if not index.is_trained:
        raise ValueError("the index is not trained: nothing to write")
    cal, tables = index.calibration, index.probe_table
    parts = tables.tables if tables else ()
    arrays = {
        "faiss_index": faiss.serialize_index(index.index),
        "gmm": _gmm_bytes(index.gmm),
        "calibration_queries": cal.queries, "calibration_ids": cal.ids, "calibration_distances": cal.distances,
        "calibration_self_pending": cal.self_pending,
        "table_edges": np.concatenate([t.edges for t in parts]) if parts else np.empty(0),
        "table_recall": np.concatenate([t.recall for t in parts]) if parts else np.empty((0, 0)),
        "table_cost": np.concatenate([t.cost for t in parts]) if parts else np.empty((0, 0)),
        "table_counts": np.concatenate([t.counts for t in parts]) if parts else np.empty(0, np.int64),
        "table_widths": np.array([t.width for t in parts], np.int64),
        "table_bins": np.array([t.counts.size for t in parts], np.int64),
        "table_range": np.array([[t.low, t.high] for t in parts], np.float64).reshape(-1, 2),
    }
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "d": index.d, "nlist": index.nlist, "encoding": index.encoding, "metric": index.metric,
        "settings": index.settings(), "gmm_params": _jsonable(index.gmm_params),
        "ntotal": index.ntotal, "next_id": index._next_id, "max_dup": index._max_dup,
        "spill_threshold": index.spill_threshold, "table_ntotal": index._table_ntotal, "has_table": tables is not None, "calibration_source": cal.source,
        "n_entries": int(index.index.ntotal), "faiss_class": type(index.index).__name__,
        "faiss_version": faiss.__version__,
    }
    header_bytes = json.dumps(header, sort_keys=True).encode()
    digest = checksum(header_bytes, arrays, FILE_ARRAYS)
    with open(path, "wb") as f:
        np.savez(f, header=np.frombuffer(header_bytes, np.uint8), sha256=np.array(digest), **arrays)


def read_index(path) -> GMMIndexIVF:
    """Read a GMMIndexIVF written by :func:`write_index`.

    Raises
    ------
    FileNotFoundError if ``path`` does not exist; ValueError naming the file if it is a
    plain FAISS index, truncated, corrupt, of another format or version, or inconsistent.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        if len(magic) == 4 and magic[:1] == b"I" and magic.isalnum():  # FAISS's fourcc, e.g. b'IwFl'
            raise ValueError(f"{path}: this is a plain FAISS index; use faiss.read_index")
        raise ValueError(f"{path}: not a {FORMAT} file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            members = FILE_ARRAYS if "table_range" in npz.files else _VERSION_ARRAYS[3]
            missing = [m for m in ("header", "sha256") + members if m not in npz.files]
            if missing:
                raise ValueError(f"members {missing} are missing")
            arrays = {m: npz[m] for m in members}
            header_bytes, digest = npz["header"], npz["sha256"]
    except FileNotFoundError:
        raise
    except READ_ERRORS as err:
        raise ValueError(f"{path}: not a readable {FORMAT} file (corrupt or truncated?): {err}") from err
    if header_bytes.dtype != np.uint8 or header_bytes.ndim != 1 or digest.shape != () or digest.dtype.kind != "U":
        raise ValueError(f"{path}: malformed header or checksum member")
    if checksum(header_bytes.tobytes(), arrays, members) != str(digest):
        raise ValueError(f"{path}: contents do not match the SHA-256 checksum (corrupt or edited file)")
    header = _header(path, header_bytes.tobytes())
    if _VERSION_ARRAYS[header["format_version"]] != members:
        raise ValueError(f"{path}: its members do not match format_version {header['format_version']}")
    for member in ("faiss_index", "gmm"):
        if arrays[member].dtype != np.uint8 or arrays[member].ndim != 1:
            raise ValueError(f"{path}: member {member!r} is {arrays[member].dtype}{arrays[member].shape}, "
                             "expected a uint8 byte array")
    try:
        inner = faiss.deserialize_index(arrays["faiss_index"])
    except RuntimeError as err:
        raise ValueError(f"{path}: FAISS cannot read the stored index: {str(err).strip()}") from err
    except MemoryError as err:  # std::bad_alloc: a size field FAISS trusts asks for more than there is
        raise ValueError(f"{path}: FAISS ran out of memory reading the stored index (a damaged size field, or an "
                         "index larger than this machine's memory)") from err
    try:
        gmm = GaussianMixture.load(io.BytesIO(arrays["gmm"].tobytes()))
    except ValueError as err:
        raise ValueError(f"{path}: the stored GaussianMixture is unreadable: {err}") from err
    try:
        index = GMMIndexIVF(header["d"], header["nlist"], header["encoding"], header["metric"],
                            **header["settings"], gmm=gmm)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: settings in the header are invalid: {err}") from err
    index.gmm_params = header["gmm_params"]
    _check_inner(path, inner, index, header, gmm)
    _check_counters(path, inner, header)
    index.index = inner
    index.index.nprobe = index.nprobe
    index._ntotal, index._next_id, index._max_dup = header["ntotal"], header["next_id"], header["max_dup"]
    index._synced_entries = int(inner.ntotal)  # the checksummed header holds ntotal: no recount
    index.spill_threshold = float(header["spill_threshold"])
    index.calibration = _calibration(path, arrays, index, header)
    if header["has_table"]:
        index.probe_table = _table(path, arrays)
        index._table_ntotal = header["table_ntotal"]
    return index


def _header(path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: malformed header: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if header.get("format_version") not in _VERSION_ARRAYS:
        raise ValueError(f"{path}: format_version {header.get('format_version')!r} is not supported "
                         f"(this library reads versions {sorted(_VERSION_ARRAYS)})")
    needed = ("d", "nlist", "encoding", "metric", "settings", "gmm_params", "ntotal", "next_id", "max_dup",
              "spill_threshold",
              "table_ntotal", "has_table", "calibration_source", "n_entries", "faiss_class")
    missing = [key for key in needed if key not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")
    for key in ("ntotal", "next_id", "max_dup", "n_entries", "table_ntotal"):
        if isinstance(header[key], bool) or not isinstance(header[key], int) or header[key] < 0:
            raise ValueError(f"{path}: header field {key} must be an integer >= 0, got {header[key]!r}")
    if isinstance(header["spill_threshold"], bool) or not isinstance(header["spill_threshold"], (int, float)) \
            or header["spill_threshold"] != header["spill_threshold"]:
        raise ValueError(f"{path}: header field spill_threshold must be a number, got {header['spill_threshold']!r}")
    if not isinstance(header["settings"], dict) or not isinstance(header["gmm_params"], dict):
        raise ValueError(f"{path}: header fields settings and gmm_params must be objects")
    return header


def _check_inner(path, inner, index, header, gmm):
    if type(inner).__name__ != header["faiss_class"] or not isinstance(inner, SUPPORTED_IVF):
        raise ValueError(f"{path}: stored FAISS index is {type(inner).__name__}, header says {header['faiss_class']}")
    if type(inner) is not type(index.index):
        raise ValueError(f"{path}: stored FAISS index is {type(inner).__name__}, but encoding "
                         f"{header['encoding']!r} gives {type(index.index).__name__}")
    if (inner.d, inner.nlist, inner.metric_type) != (index.d, index.nlist, index.index.metric_type):
        raise ValueError(f"{path}: stored FAISS index has d={inner.d}, nlist={inner.nlist}, metric "
                         f"{inner.metric_type}; header says d={index.d}, nlist={index.nlist}, metric {index.metric!r}")
    if inner.ntotal != header["n_entries"] or not inner.is_trained:
        raise ValueError(f"{path}: stored FAISS index holds {inner.ntotal} entries (trained={inner.is_trained}), "
                         f"header says {header['n_entries']}")
    quantizer = faiss.downcast_index(inner.quantizer)
    kind = index.coarse.rstrip("0123456789")
    want = {"flat": (faiss.IndexFlat,), "hnsw": (faiss.IndexHNSW,), "pca": (faiss.IndexRefine,),
            "auto": (faiss.IndexHNSW, faiss.IndexRefine)}[kind]
    if not isinstance(quantizer, want) or quantizer.ntotal != index.nlist:
        raise ValueError(f"{path}: the stored quantizer is {type(quantizer).__name__} with {quantizer.ntotal} "
                         f"means; coarse={index.coarse!r} and nlist={index.nlist} need a "
                         f"{' or '.join(w.__name__ for w in want)}")
    if gmm.means_.shape != (index.nlist, index.d) or not np.array_equal(
            means_index(quantizer).reconstruct_n(0, index.nlist), gmm.means_.astype(np.float32)):
        raise ValueError(f"{path}: the quantizer's centroids differ from the stored GMM means")


def _check_counters(path, inner, header):
    """The header's counters against the ids the lists hold: ntotal distinct ids, next_id past
    the largest (a smaller one would make ``add`` reuse ids), max_dup at most one copy per list
    (the most copies a vector ever had: removals leave it, so the entries may now be fewer)."""
    ids = stored_ids(inner)
    if header["ntotal"] != ids.size:
        raise ValueError(f"{path}: header says ntotal={header['ntotal']}, but the lists hold {ids.size} distinct ids")
    if ids.size and header["next_id"] <= int(ids[-1]):
        raise ValueError(f"{path}: header says next_id={header['next_id']}, but the lists hold id {int(ids[-1])}")
    if not 1 <= header["max_dup"] <= inner.nlist:
        raise ValueError(f"{path}: header field max_dup={header['max_dup']} is outside [1, nlist={inner.nlist}]")


def _calibration(path, arrays, index, header) -> Calibration:
    queries, ids, distances, pending = (arrays[m] for m in _CALIBRATION)
    nc = queries.shape[0] if queries.ndim == 2 else -1
    if queries.dtype != np.float32 or queries.shape != (nc, index.d) or ids.dtype != np.int64 \
            or ids.shape != (nc, K_CAL) or distances.dtype != np.float32 or distances.shape != (nc, K_CAL) \
            or pending.dtype != np.bool_ or pending.shape != (nc,):
        raise ValueError(f"{path}: calibration arrays have inconsistent shapes or dtypes")
    if not np.isfinite(queries).all() or (ids < -1).any() or (ids >= max(header["next_id"], 1)).any():
        raise ValueError(f"{path}: calibration arrays hold non-finite queries or ids outside the index")
    return Calibration(queries, ids, distances, int(index.index.metric_type), str(header["calibration_source"]),
                       pending)


def _table(path, arrays) -> ProbeTables:
    edges, recall, cost, counts, widths, bins = (arrays[m] for m in _TABLE)
    if widths.ndim != 1 or bins.shape != widths.shape or not widths.size or widths.dtype.kind not in "iu" \
            or bins.dtype.kind not in "iu" or (widths < 1).any() or (bins < 1).any():
        raise ValueError(f"{path}: depth table widths and bin counts are malformed")
    nb = int(bins.sum())
    if counts.shape != (nb,) or edges.shape != (nb - widths.size,) or recall.ndim != 2 or recall.shape[0] != nb \
            or cost.shape != recall.shape or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise ValueError(f"{path}: depth table arrays have inconsistent shapes")
    if not all(np.isfinite(a).all() for a in (edges, recall, cost)):
        raise ValueError(f"{path}: depth table holds NaN or infinity")
    ranges = arrays.get("table_range", np.tile([-np.inf, np.inf], (widths.size, 1)))
    if ranges.shape != (widths.size, 2) or ranges.dtype != np.float64 or np.isnan(ranges).any() \
            or (ranges[:, 0] > ranges[:, 1]).any():
        raise ValueError(f"{path}: depth table ranges are malformed")
    ends, edge_ends = np.cumsum(bins), np.cumsum(bins - 1)
    return ProbeTables([ProbeTable(edges[e - b + 1:e], recall[n - b:n], cost[n - b:n], counts[n - b:n], int(w),
                                   float(lo), float(hi))
                        for w, b, n, e, (lo, hi) in zip(widths, bins, ends, edge_ends, ranges)])


def _jsonable(params: dict) -> dict:
    bad = [k for k, v in params.items() if not isinstance(v, (str, int, float, bool, type(None)))]
    if bad:
        raise ValueError(f"GaussianMixture arguments {bad} cannot be written to the index header "
                         "(pass a fitted gmm= instead)")
    return dict(params)


def _gmm_bytes(gmm) -> np.ndarray:
    """The GaussianMixture's own file format, as bytes."""
    buffer = io.BytesIO()
    gmm.save(buffer)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)
