"""SignRound tuning (DESIGN.md §4): calibration data (``data``), block-input caching (``cache``), the per-block
loop (``signround``), optimised RTN (``opt_rtn``), options, report, and the model-level driver ``tune_model``."""
from .data import CalibrationData, get_calibration_data
from .driver import tune_model
from .report import TuningReport

__all__ = ["CalibrationData", "TuningReport", "get_calibration_data", "tune_model"]
