"""Finding and loading libcudnn: the one place that knows where cuDNN can live.

Order: the ``CUDNN_BN_LIBRARY`` environment variable (an explicit path, nothing else tried), then
cuda-pathfinder (the nvidia-cudnn-cu12 / -cu13 wheels, conda, the system search path). Nothing
here runs at import time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

from .errors import CudnnLibraryNotFoundError

__all__ = ["ENV_VAR", "FIX_HINT", "LoadedLibrary", "load_cudnn"]

ENV_VAR = "CUDNN_BN_LIBRARY"
FIX_HINT = (
    "Install it with: pip install 'cudnn_bn[cuda12]' (or pip install nvidia-cudnn-cu12; "
    "nvidia-cudnn-cu13 for CUDA 13), or set CUDNN_BN_LIBRARY to the path of libcudnn.so.9."
)


@dataclasses.dataclass(frozen=True)
class LoadedLibrary:
    """A loaded libcudnn and where it came from."""

    cdll: ctypes.CDLL
    path: str
    found_via: str


def _load_explicit(path: str) -> LoadedLibrary:
    try:
        return LoadedLibrary(ctypes.CDLL(path), os.path.abspath(path), f"${ENV_VAR}")
    except OSError as error:
        raise CudnnLibraryNotFoundError([f"${ENV_VAR}={path}: {error}"], FIX_HINT) from None


def _load_with_pathfinder(searched: list[str]) -> LoadedLibrary | None:
    try:
        from cuda import pathfinder
    except ImportError as error:
        searched.append(f"cuda.pathfinder: not importable ({error}); pip install cuda-pathfinder")
        return None
    try:
        found = pathfinder.load_nvidia_dynamic_lib("cudnn")
    except Exception as error:  # pathfinder raises several types; its message says where it looked
        wheels = _installed_cudnn_wheels()
        searched.append(
            f"the nvidia-cudnn wheels: {', '.join(wheels)} installed" if wheels
            else "the nvidia-cudnn wheels: neither nvidia-cudnn-cu12 nor nvidia-cudnn-cu13 is installed"
        )
        searched.append(
            "cuda.pathfinder (site-packages nvidia/cudnn/lib of the cu12 and cu13 wheels, conda, "
            f"LD_LIBRARY_PATH and the system loader): {type(error).__name__}: {error}"
        )
        return None
    return LoadedLibrary(ctypes.CDLL(found.abs_path), found.abs_path, f"cuda.pathfinder ({found.found_via})")


def _installed_cudnn_wheels() -> list[str]:
    """Names of the installed cuDNN wheels. Without one, pathfinder's error names whichever library
    it tried last (often libcublasLt, a dependency), not cuDNN."""
    from importlib import metadata

    found = []
    for name in ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def load_cudnn() -> LoadedLibrary:
    """Load libcudnn, or raise CudnnLibraryNotFoundError listing every place that was tried."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return _load_explicit(explicit)
    searched: list[str] = [f"${ENV_VAR}: not set"]
    loaded = _load_with_pathfinder(searched)
    if loaded is None:
        raise CudnnLibraryNotFoundError(searched, FIX_HINT)
    return loaded
