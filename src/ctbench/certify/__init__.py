"""Certification: the cascade of stages (IBP -> CROWN-IBP -> attack -> alpha-CROWN -> branch and
bound), per-sample verdicts proven by rigorous floating-point bounds (``rigorous``), sharding,
resume and merging, and export to ONNX + VNN-LIB for external verifiers.

This package is also callable: ``ctbench.certify(model, inputs, labels, eps, ...)`` is the
public ``ctbench.api.certify``, and ``ctbench.certify.certify`` the cascade it calls.
"""
import sys
import types

from .bab import BabResult, BabSettings, BranchAndBound
from .cascade import (
    CertifyResult, Shard, SoundnessError, append_verdicts, certify, default_out_dir, merge, read_verdicts,
    summarize,
)
from .provenance import Provenance, ProvenanceMismatch
from .soundness import SafetyMargin
from .stages import (
    DEFAULT_STAGES, STAGES, AlphaCrownSettings, CertifyInputError, AttackSettings, CertifySettings, MilpSettings, build_stage,
    stage_names,
)
from .verdicts import (
    VERDICTS, CounterexampleCheck, InvalidCounterexample, InvalidVerdict, Verdict, VerdictBook, VerdictConflict,
    check_counterexample, falsified_verdict,
)

__all__ = [
    "AlphaCrownSettings", "AttackSettings", "BabResult", "BabSettings", "BranchAndBound", "CertifyResult",
    "CertifySettings", "CounterexampleCheck", "DEFAULT_STAGES", "InvalidCounterexample", "InvalidVerdict",
    "MilpSettings", "STAGES", "SafetyMargin", "Shard", "SoundnessError", "VERDICTS", "Verdict", "VerdictBook",
    "VerdictConflict", "append_verdicts", "build_stage", "certify", "default_out_dir", "check_counterexample", "falsified_verdict",
    "merge", "read_verdicts", "stage_names", "summarize",
]


class _CallablePackage(types.ModuleType):
    """The ``ctbench.certify`` package, callable as the public function ``ctbench.certify``."""

    def __call__(self, model, inputs, labels, eps, stages=None, timeout=None, **options):
        """``ctbench.api.certify``: per-sample verdicts of ``model`` on (inputs, labels) at radius eps."""
        from ..api import certify as certify_inputs

        return certify_inputs(model, inputs, labels, eps, stages=stages, timeout=timeout, **options)


sys.modules[__name__].__class__ = _CallablePackage
