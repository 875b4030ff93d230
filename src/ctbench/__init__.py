"""ctbench: deterministic certified training against L_inf perturbations."""
from importlib.metadata import PackageNotFoundError, version as _installed_version

try:
    __version__ = _installed_version("ctbench")
except PackageNotFoundError:  # a source tree on sys.path without installation
    __version__ = "0+unknown"
