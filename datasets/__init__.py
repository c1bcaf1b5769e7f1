"""Dataset layer: vector file formats, named benchmark sets and exact ground truth.

Readers memory-map (texmex ``.fvecs/.ivecs/.bvecs``, big-ann ``.fbin/.ibin/.u8bin/.i8bin``,
``.npy``) or open lazily (ann-benchmarks HDF5), so sets larger than RAM can be streamed with
``iter_chunks``.  Nothing is ever unpickled.
"""
from .arrays import iter_chunks
from .bundled import bundled_dataset
from .dataset import Dataset
from .formats import SUPPORTED_SUFFIXES, read_vectors, write_vectors
from .groundtruth import exact_knn, ground_truth
from .hdf5 import AnnBenchmarksFile, read_ann_hdf5, write_ann_hdf5
from .metric import METRICS, normalize_rows
from .registry import list_datasets, load_dataset, search_roots

__all__ = ["METRICS", "SUPPORTED_SUFFIXES", "AnnBenchmarksFile", "Dataset", "bundled_dataset", "exact_knn",
           "ground_truth", "iter_chunks", "list_datasets", "load_dataset", "normalize_rows",
           "read_ann_hdf5", "read_vectors", "search_roots", "write_ann_hdf5", "write_vectors"]
