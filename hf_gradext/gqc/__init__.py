"""Gradient Quality Control: decide per microbatch whether to step or keep accumulating.

``controllers`` (decision rules), ``schedules`` (threshold over data), ``core`` (window bookkeeping),
``noise`` (per-sample noise scale of ``gns_sample``), ``lr_coupling`` (LR scaled with the window size,
Seesaw), ``wrapper`` (``GQCOptimizer`` for custom loops) and ``factories`` (torch-gqc's ``make_*``),
``run`` + ``loop`` + ``sample_norms`` (the ``GradExtTrainer`` integration).
"""

from hf_gradext.gqc import factories
from hf_gradext.gqc.controllers import (
    GNS,
    GNTS,
    MHT,
    SBC,
    Controller,
    GNSSample,
    Observation,
    Seesaw,
    build_controller,
)
from hf_gradext.gqc.core import Decision, GQCCore
from hf_gradext.gqc.lr_coupling import PowerCoupling, SeesawPlan
from hf_gradext.gqc.noise import NoiseEstimate, SampleNormStats, estimate_noise, sample_norm_vector
from hf_gradext.gqc.schedules import ThresholdSchedule
from hf_gradext.gqc.wrapper import GQCOptimizer

__all__ = [
    "GNS",
    "GNTS",
    "MHT",
    "SBC",
    "Controller",
    "Decision",
    "GNSSample",
    "GQCCore",
    "GQCOptimizer",
    "NoiseEstimate",
    "Observation",
    "PowerCoupling",
    "SampleNormStats",
    "Seesaw",
    "SeesawPlan",
    "ThresholdSchedule",
    "build_controller",
    "estimate_noise",
    "factories",
    "sample_norm_vector",
]
