"""E-step and M-step kernels: fused Triton passes and the torch reference of the same math.

``estep`` and ``log_norm`` run the Triton kernels (CUDA, or the CPU under
``TRITON_INTERPRET=1``), on a GPU rows wider than 128 features as cuBLAS products
(``gemm``); ``reference.estep`` is the torch version, used as the CPU path and as
the oracle in tests. ``m_step`` is the M-step of a GPU fit (``mstep``; the torch M-step of
``flashgmm_ivf._mstep`` is its oracle).
"""
from . import reference
from .estep import PRECISIONS, LaunchConfig, candidate_hints, default_configs, estep, log_norm
from .mstep import m_step
from .params import CholeskyParams, KernelWeights, NaturalParams, kernel_weights, natural_params
from .result import EStepResult

__all__ = ["PRECISIONS", "CholeskyParams", "EStepResult", "KernelWeights", "LaunchConfig", "NaturalParams",
           "candidate_hints", "default_configs", "estep", "kernel_weights", "log_norm", "m_step", "natural_params", "reference"]
