"""flashgmm-ivf: a FAISS IVF index searched to a recall target, and Gaussian mixture models with a fused Triton E-step."""
from ._estimator import ConvergenceWarning
from .ivf import GMMIndexIVF, extract_index_ivf, index_factory, read_index, write_index
from .mixture import GaussianMixture

__version__ = "0.1.0"
__all__ = ["ConvergenceWarning", "GMMIndexIVF", "GaussianMixture", "__version__", "extract_index_ivf", "index_factory",
           "read_index", "write_index"]
