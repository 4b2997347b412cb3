"""Capacity planning: memory per device and step time of parallel training layouts, and `check-config`.

`model.py` is the cost model, `hardware.py` the machine it models (and the one efficiency constant),
`search.py` enumerates and ranks layouts, `check.py` checks a run YAML, `cli.py` registers the commands.
"""
from .hardware import ATLAS_800T_A2, EFFICIENCY, Hardware
from .model import Estimate, Plan, estimate, validate_plan

__all__ = ["ATLAS_800T_A2", "EFFICIENCY", "Estimate", "Hardware", "Plan", "estimate", "validate_plan"]
