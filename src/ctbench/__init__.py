"""ctbench: deterministic certified training against L_inf perturbations.

The public API (README, "Python API"): ``ctbench.train``, ``ctbench.evaluate``,
``ctbench.certify`` and ``ctbench.bounds.ibp`` / ``ctbench.bounds.crown``, each imported on
first use.
"""
from importlib.metadata import PackageNotFoundError, version as _installed_version

try:
    __version__ = _installed_version("ctbench")
except PackageNotFoundError:  # a source tree on sys.path without installation
    __version__ = "0+unknown"

__all__ = ["__version__", "bounds", "certify", "evaluate", "train"]
_API_FUNCTIONS = ("train", "evaluate")
_SUBPACKAGES = ("bounds", "certify")  # ctbench.certify is callable (certify/__init__.py)


def __getattr__(name: str):
    """The public API, imported on first use so that ``import ctbench`` stays light."""
    import importlib

    if name in _API_FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.api"), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
