"""Where data sets and caches live on disk."""
from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming the data directory.
DATA_ENV = "FLASHGMM_DATA"

# The repository keeps its shared small sets in ../shared/data beside the checkout: found
# from this file in an editable install (datasets/ is a top-level folder of the repository),
# and from the working directory (a checkout's root) when the package is installed as a wheel.
_SHARED_DATA = (Path(__file__).resolve().parents[1].parent / "shared" / "data",
                Path.cwd().parent / "shared" / "data")


def cache_root() -> Path:
    """``~/.cache/flashgmm-ivf``: parent of the default data and ground-truth folders."""
    return Path.home() / ".cache" / "flashgmm-ivf"


def data_dir(explicit=None) -> Path:
    """The data directory: ``explicit`` if given, else ``$FLASHGMM_DATA``, else
    ``~/.cache/flashgmm-ivf/data``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else cache_root() / "data"


def shared_data_dir() -> Path:
    """The repository's shared data folder, ``<repo>/../shared/data`` (may not exist)."""
    return next((path for path in _SHARED_DATA if path.is_dir()), _SHARED_DATA[0])


def gt_cache_dir() -> Path:
    """Default folder of cached ground-truth files, ``~/.cache/flashgmm-ivf/gt``."""
    return cache_root() / "gt"
