"""flashgmm-ivf: Gaussian mixture models with a fused Triton E-step, as FAISS IVF coarse quantizers."""
from .ivf import GMMIndexIVF, index_factory, read_index, write_index
from ._estimator import ConvergenceWarning
from .mixture import GaussianMixture

__version__ = "0.1.0"
__all__ = ["ConvergenceWarning", "GMMIndexIVF", "GaussianMixture", "__version__", "index_factory", "read_index",
           "write_index"]
