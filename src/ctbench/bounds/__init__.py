"""The bound engine: pure functions from a lowered network and an input box to bounds.

For a model and a box, ``ctbench.bounds.ibp(model, lower, upper)`` and
``ctbench.bounds.crown(model, lower, upper, ...)`` (``network_bounds``) give its output bounds.
These two names are functions: they stand in the package's namespace where the submodules
``bounds.ibp`` and ``bounds.crown`` would, which stay importable by their full names
(``from ctbench.bounds.crown import crown_bounds``).
"""
from .box import Box, linf_box, sample_in_box
from .crown import (
    LinearBound, alpha_crown, alpha_crown_bounds, apply_splits, crown_bounds, crown_ibp_margin_lower,
    crown_margin_lower, crown_upper_bounds, intermediate_bounds,
)
from .ibp import IBPOptions, ibp_margin_lower, interval_bounds
from .spec import is_certified, margin_spec, worst_case_logits

__all__ = ["Box", "IBPOptions", "LinearBound", "alpha_crown", "alpha_crown_bounds", "apply_splits",
           "crown_bounds", "crown_ibp_margin_lower", "crown_margin_lower", "crown_upper_bounds",
           "ibp_margin_lower", "intermediate_bounds", "interval_bounds", "is_certified", "linf_box",
           "margin_spec", "sample_in_box", "worst_case_logits"]

# the public model-level functions, named after the two domains (after the submodule imports above)
from .network_bounds import network_crown as crown, network_ibp as ibp  # noqa: E402

__all__ += ["crown", "ibp"]
