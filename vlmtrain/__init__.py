"""vlmtrain: multi-stage training of vision-language models."""

__version__ = "0.1.0"
