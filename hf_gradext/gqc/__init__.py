"""Gradient Quality Control: decide per microbatch whether to step or keep accumulating.

``controllers`` (decision rules), ``schedules`` (threshold over data), ``core`` (window bookkeeping),
``wrapper`` (``GQCOptimizer`` for custom loops), ``run`` + ``loop`` (the ``GradExtTrainer`` integration).
"""

from hf_gradext.gqc.controllers import GNS, GNTS, MHT, SBC, Controller, Observation, build_controller
from hf_gradext.gqc.core import Decision, GQCCore
from hf_gradext.gqc.schedules import ThresholdSchedule
from hf_gradext.gqc.wrapper import GQCOptimizer

__all__ = [
    "GNS",
    "GNTS",
    "MHT",
    "SBC",
    "Controller",
    "Decision",
    "GQCCore",
    "GQCOptimizer",
    "Observation",
    "ThresholdSchedule",
    "build_controller",
]
