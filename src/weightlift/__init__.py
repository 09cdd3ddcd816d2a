"""weightlift: run PyTorch models bigger than your accelerator by streaming weights layer-ahead."""

from .config import OffloadConfig
from .entry import offload
from .errors import OffloadError
from .hooks import OffloadHandle
from .plan import Plan, plan
from .report import OffloadReport

__all__ = ["OffloadConfig", "OffloadError", "OffloadHandle", "OffloadReport", "Plan", "offload", "plan"]
__version__ = "0.1.0"
