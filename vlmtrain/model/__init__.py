"""Model components (vision tower, projector, LM) and their assembly."""

from vlmtrain.model.vlm import VisionLanguageModel

__all__ = ["VisionLanguageModel"]
