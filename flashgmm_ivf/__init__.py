"""flashgmm-ivf: Gaussian mixture models with a fused Triton E-step, as FAISS IVF coarse quantizers."""
from .ivf import GMMIndexIVF, extract_index_ivf, index_factory, read_index, write_index
from .mixture import ConvergenceWarning, GaussianMixture

__version__ = "0.1.0"
__all__ = ["ConvergenceWarning", "GMMIndexIVF", "GaussianMixture", "__version__", "extract_index_ivf", "index_factory", "read_index",
           "write_index"]
