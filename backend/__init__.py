"""Label Studio ML backend for zero-shot image pre-labeling with open_clip."""

__version__ = "0.1.0"
