"""ViT-Linearizer: distil quadratic Vision Transformers into linear-time recurrent vision models."""
from . import models  # noqa: F401  (registers the Adventurer family with timm)
from .ops import linear_recurrence

__version__ = "0.1.0"
__all__ = ["linear_recurrence", "models", "__version__"]
