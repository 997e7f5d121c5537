"""Model-specific knowledge lives here and only here (see registry.py)."""

from losa.models.registry import ARCHITECTURES, Architecture, architecture_of, supported_model_types

__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "supported_model_types"]
