"""GMM coarse quantizer inside FAISS IndexIVF: soft assignment, dedup search, drop-in API.

Small functions over real FAISS objects (in the style of ``faiss.contrib.ivf_tools``):

- :mod:`.quantizer`: the GMM means as the flat quantizer of an IndexIVFFlat / IVFPQ /
  IVFScalarQuantizer, true coarse distances, posterior ranking of lists, adding copies.
- :mod:`.soft_assign`: log-space soft assignment (threshold tau or copies budget).
- :mod:`.index`: :class:`GMMIndexIVF` and :func:`index_factory` (FAISS verbs).
- :mod:`.index_io`: :func:`write_index` / :func:`read_index` (npz + JSON header, no pickle).
- :mod:`.probing`: query-adaptive probing of any FAISS IVF index (a per-query nprobe from a
  table calibrated on training queries, or a GMM log-likelihood gap), :func:`search_adaptive`.
- :mod:`.pruning`: :func:`search_pruned`, lists nearest mean first, each skipped when a
  half-space bound says it cannot beat the query's running k-th neighbour.
"""
from .index import GMMIndexIVF, SearchStats, dedup_results, index_factory, search_dedup
from .index_io import read_index, write_index
from .probing import ProbeTable, distance_spread, gap_nprobe, ranked_lists, search_adaptive
from .pruning import halfspace_bounds, search_pruned
from .soft_assign import SoftAssignment, TopComponents, assign_budget, assign_tau, soft_assign, top_components

__all__ = ["GMMIndexIVF", "ProbeTable", "SearchStats", "SoftAssignment", "TopComponents", "assign_budget",
           "assign_tau", "dedup_results", "distance_spread", "gap_nprobe", "halfspace_bounds", "index_factory",
           "ranked_lists", "read_index", "search_adaptive", "search_dedup", "search_pruned", "soft_assign",
           "top_components", "write_index"]
