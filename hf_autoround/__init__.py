"""hf_autoround: AutoRound weight-only quantisation as a native Hugging Face transformers quantizer."""
from .autoround import AutoRound
from .config import AutoRoundConfig
from .registration import register
from .scheme import QuantScheme

register()

__all__ = ["AutoRound", "AutoRoundConfig", "QuantScheme", "register"]
__version__ = "0.1.0"
