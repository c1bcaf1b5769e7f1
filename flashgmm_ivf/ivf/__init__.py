"""A GMM (or k-means) partition inside a real FAISS IndexIVF, searched to a recall target.

Small functions over real FAISS objects (in the style of ``faiss.contrib.ivf_tools``):

- :mod:`.index`: :class:`GMMIndexIVF` and :func:`index_factory` (FAISS verbs, the recipe's options).
- :mod:`.index_io`: :func:`write_index` / :func:`read_index` (npz + JSON header, one checksum, no pickle).
- :mod:`.partition`: fitting the partition (GMM or k-means) and assigning vectors to lists.
- :mod:`.spill`, :mod:`.soft_assign`: rules for a vector's second list (SOAR, RAIR, ...; GMM responsibilities).
- :mod:`.quantizer`: the means as the quantizer of an IndexIVFFlat / IVFPQ / IVFScalarQuantizer.
- :mod:`.coarse`: coarse steps over the means (flat, HNSW graph, projected ranking) and their costs.
- :mod:`.search`: ranking the lists, deduplicated ``search_preassigned``, :class:`SearchStats`.
- :mod:`.probing`: a per-query depth from a calibrated :class:`ProbeTable`.
- :mod:`.pruning`: radius pruning, lists skipped by a half-space bound.
- :mod:`.calibration`: calibration queries, their exact neighbours, fitting the table.
- :mod:`.exact`: exact nearest neighbours and nearest means by squared L2, about a centre.
- :mod:`.shards`: building, merging and searching shards of one trained index.

Every search function returns FAISS's ``(D, I)``, deduplicated by id, and adds its costs to
an optional ``stats=SearchStats()`` argument (as FAISS's ``search_preassigned`` fills an
``IndexIVFStats``); ``GMMIndexIVF.search`` sets ``last_stats``.
"""
from .calibration import Calibration
from .index import PROBES, GMMIndexIVF, extract_index_ivf, index_factory
from .index_io import read_index, write_index
from .probing import ProbeTable, ProbeTables, adaptive_lists, distance_spread, search_adaptive, similarity_gap
from .pruning import halfspace_bounds, search_pruned
from .search import SearchStats, dedup_results, ranked_lists, search_nprobe, search_preassigned

__all__ = ["PROBES", "Calibration", "GMMIndexIVF", "ProbeTable", "ProbeTables", "SearchStats", "adaptive_lists", "dedup_results",
           "distance_spread", "extract_index_ivf", "halfspace_bounds", "index_factory", "ranked_lists", "read_index", "search_adaptive",
           "search_nprobe", "search_preassigned", "search_pruned", "similarity_gap", "write_index"]
