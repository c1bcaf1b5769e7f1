"""What a benchmark ran on: versions, device, machine load and the git commit, for its JSON."""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import faiss
import numpy as np
import torch
import triton


def _git(*args) -> str | None:
    """``git args`` in the checkout this module lies in, or, for an installed copy (site-packages
    is no checkout), in the working directory the benchmark runs from."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                 check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            return out.stdout.strip() or None
    return None


def environment(device: torch.device | None = None) -> dict:
    """Versions, the device (CUDA properties or the CPU and its threads), CPU count and load, and
    the commit: ``FLASHGMM_COMMIT`` where set (a copy of the tree whose git HEAD is stale, as
    on a lent GPU machine), else the checkout's HEAD and whether it had uncommitted changes."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    commit = os.environ.get("FLASHGMM_COMMIT")
    env = {"python": platform.python_version(), "platform": platform.platform(), "numpy": np.__version__,
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "faiss": faiss.__version__, "commit": commit or _git("rev-parse", "HEAD"),
           # Results a run writes into eval/results do not make the code it ran differ from the commit.
           "uncommitted_changes": None if commit else bool(_git("status", "--porcelain", "--", ".",
                                                                ":(exclude)eval/results")),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
           "load_average_at_start": list(os.getloadavg()), "faiss_omp_threads": faiss.omp_get_max_threads(),
           "omp_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device": props.name, "sm_count": props.multi_processor_count,
                "memory_gib": props.total_memory / 2**30}
    else:
        env |= {"device": f"cpu ({platform.processor() or platform.machine()})", "threads": torch.get_num_threads()}
    return env
