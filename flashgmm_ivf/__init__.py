"""flashgmm-ivf: Gaussian mixture models with a fused Triton E-step, as FAISS IVF coarse quantizers."""
from .mixture import ConvergenceWarning, GaussianMixture

__version__ = "0.1.0"
__all__ = ["ConvergenceWarning", "GaussianMixture", "__version__"]
