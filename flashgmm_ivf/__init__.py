"""flashgmm-ivf: a FAISS IVF index searched to a recall target, and Gaussian mixture models with a fused Triton E-step."""
import os as _os

# The wheel maps the top-level kernels/, datasets/ and eval/ folders in as subpackages. Imported from a
# source checkout instead (``python -m pytest`` in the repository root puts it first on sys.path, ahead
# of an installed wheel), this folder has none of them: they are found beside it.
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")):
    __path__.append(_os.path.dirname(__path__[0]))

from ._estimator import ConvergenceWarning
from .ivf import GMMIndexIVF, extract_index_ivf, index_factory, read_index, write_index
from .mixture import GaussianMixture

__version__ = "0.1.0"
__all__ = ["ConvergenceWarning", "GMMIndexIVF", "GaussianMixture", "__version__", "extract_index_ivf", "index_factory",
           "read_index", "write_index"]
