"""GMMIndexIVF files: FAISS index bytes + GMM file bytes + a versioned JSON header, in one .npz.

Members (all plain arrays, read with ``np.load(..., allow_pickle=False)``; nothing is pickled):

- ``header``: JSON string: format name and version, index settings (d, nlist,
  encoding, metric, probe, nprobe, assignment policy), counters, and the SHA-256 of
  the two payloads.
- ``faiss_index``: uint8, ``faiss.serialize_index`` of the inner IndexIVF (what
  ``faiss.write_index`` would write: plain FAISS can read it on its own).
- ``gmm``: uint8, the GaussianMixture's own file (``GaussianMixture.save``: weights,
  means, covariances, parameters; its own format version).

Loading checks the zip CRCs, the header, both checksums, and that the FAISS index
and the GMM agree with the header and with each other (quantizer centroids equal
the means in float32). Any failure is a ValueError naming the file, never a crash
or a silently different index; search results after loading are bit-identical.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
import zlib

import faiss
import numpy as np

from ..mixture import GaussianMixture
from .index import GMMIndexIVF
from .quantizer import SUPPORTED_IVF

__all__ = ["write_index", "read_index", "FORMAT", "FORMAT_VERSION"]

FORMAT = "flashgmm_ivf.GMMIndexIVF"
FORMAT_VERSION = 1
_MEMBERS = ("header", "faiss_index", "gmm")


def write_index(index: GMMIndexIVF, path) -> None:
    """Write a trained GMMIndexIVF to ``path`` (an .npz; see the module docstring)."""
    if not isinstance(index, GMMIndexIVF):
        raise TypeError(f"write_index takes a GMMIndexIVF, got {type(index).__name__} "
                        "(for a plain FAISS index use faiss.write_index)")
    if not index.is_trained:
        raise ValueError("the index is not trained: nothing to write")
    faiss_bytes = faiss.serialize_index(index.index)
    gmm_bytes = _gmm_bytes(index.gmm)
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "d": index.d, "nlist": index.nlist, "encoding": index.encoding, "metric": index.metric,
        "probe": index.probe, "nprobe": index.nprobe,
        "tau": index.tau, "copies": index.copies, "max_copies": index.max_copies, "temperature": index.temperature,
        "ntotal": index.ntotal, "next_id": index._next_id, "max_dup": index._max_dup,
        "n_entries": int(index.index.ntotal), "faiss_class": type(index.index).__name__,
        "faiss_sha256": hashlib.sha256(faiss_bytes.tobytes()).hexdigest(),
        "gmm_sha256": hashlib.sha256(gmm_bytes.tobytes()).hexdigest(),
        "faiss_version": faiss.__version__,
    }
    with open(path, "wb") as f:
        np.savez(f, header=np.array(json.dumps(header)), faiss_index=faiss_bytes, gmm=gmm_bytes)


def read_index(path) -> GMMIndexIVF:
    """Read a GMMIndexIVF written by :func:`write_index`.

    Raises
    ------
    FileNotFoundError if ``path`` does not exist; ValueError naming the file if it is
    truncated, corrupt, of another format or version, or inconsistent.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [m for m in _MEMBERS if m not in npz.files]
            if missing:
                raise ValueError(f"members {missing} are missing")
            arrays = {m: npz[m] for m in _MEMBERS}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError, zlib.error) as err:
        raise ValueError(f"{path}: not a readable {FORMAT} file (corrupt or truncated?): {err}") from err
    header = _header(path, arrays["header"])
    for member in ("faiss_index", "gmm"):
        a = arrays[member]
        if a.dtype != np.uint8 or a.ndim != 1:
            raise ValueError(f"{path}: member {member!r} is {a.dtype}{a.shape}, expected a uint8 byte array")
        if hashlib.sha256(a.tobytes()).hexdigest() != header[f"{member.split('_')[0]}_sha256"]:
            raise ValueError(f"{path}: member {member!r} does not match its checksum (corrupt file)")
    try:
        inner = faiss.deserialize_index(arrays["faiss_index"])  # downcast and owning already
    except RuntimeError as err:
        raise ValueError(f"{path}: FAISS cannot read the stored index: {str(err).strip()}") from err
    try:
        gmm = GaussianMixture.load(io.BytesIO(arrays["gmm"].tobytes()))
    except ValueError as err:
        raise ValueError(f"{path}: the stored GaussianMixture is unreadable: {err}") from err
    try:
        index = GMMIndexIVF(header["d"], header["nlist"], header["encoding"], header["metric"],
                            probe=header["probe"], nprobe=header["nprobe"], tau=header["tau"],
                            copies=header["copies"], max_copies=header["max_copies"],
                            temperature=header["temperature"], gmm=gmm)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: settings in the header are invalid: {err}") from err
    _check_inner(path, inner, index, header, gmm)
    index.index = inner
    index.index.nprobe = index.nprobe
    index._ntotal, index._next_id, index._max_dup = header["ntotal"], header["next_id"], header["max_dup"]
    return index


def _header(path, array):
    try:
        header = json.loads(str(array))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed header: {err}") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{path}: format is {got!r}, expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {header.get('format_version')!r} is not supported "
                         f"(this library reads version {FORMAT_VERSION})")
    needed = ("d", "nlist", "encoding", "metric", "probe", "nprobe", "tau", "copies", "max_copies", "temperature",
              "ntotal", "next_id", "max_dup", "n_entries", "faiss_class", "faiss_sha256", "gmm_sha256")
    missing = [key for key in needed if key not in header]
    if missing:
        raise ValueError(f"{path}: header lacks {missing}")
    for key in ("ntotal", "next_id", "max_dup", "n_entries"):
        if isinstance(header[key], bool) or not isinstance(header[key], int) or header[key] < 0:
            raise ValueError(f"{path}: header field {key} must be an integer >= 0, got {header[key]!r}")
    return header


def _check_inner(path, inner, index, header, gmm):
    if type(inner).__name__ != header["faiss_class"] or not isinstance(inner, SUPPORTED_IVF):
        raise ValueError(f"{path}: stored FAISS index is {type(inner).__name__}, header says {header['faiss_class']}")
    if type(inner) is not type(index.index):
        raise ValueError(f"{path}: stored FAISS index is {type(inner).__name__}, but encoding "
                         f"{header['encoding']!r} gives {type(index.index).__name__}")
    if (inner.d, inner.nlist, inner.metric_type) != (index.d, index.nlist, index.metric_type):
        raise ValueError(f"{path}: stored FAISS index has d={inner.d}, nlist={inner.nlist}, metric "
                         f"{inner.metric_type}; header says d={index.d}, nlist={index.nlist}, metric {index.metric!r}")
    if inner.ntotal != header["n_entries"] or not inner.is_trained:
        raise ValueError(f"{path}: stored FAISS index holds {inner.ntotal} entries (trained={inner.is_trained}), "
                         f"header says {header['n_entries']}")
    quantizer = faiss.downcast_index(inner.quantizer)
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.ntotal != index.nlist:
        raise ValueError(f"{path}: the stored quantizer is not a flat index of {index.nlist} means")
    if gmm.means_.shape != (index.nlist, index.d) or not np.array_equal(
            quantizer.reconstruct_n(0, index.nlist), gmm.means_.astype(np.float32)):
        raise ValueError(f"{path}: the quantizer's centroids differ from the stored GMM means")


def _gmm_bytes(gmm) -> np.ndarray:
    """The GaussianMixture's own file format, as bytes."""
    buffer = io.BytesIO()
    gmm.save(buffer)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)
