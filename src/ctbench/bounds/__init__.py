"""The bound engine: pure functions from a lowered network and an input box to bounds."""
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
