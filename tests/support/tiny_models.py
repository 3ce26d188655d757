"""Tiny open_clip architectures (random weights) for fast tests of loading and scoring code."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_SIGLIP = {**TINY_CLIP, "init_logit_bias": -10}


def write_config(directory: Path, family: str = "clip") -> Path:
    """Write an open_clip model-config JSON and return its path.

    The SigLIP-family file must not have "siglip" in its name: open_clip picks the SigLIP
    (Hugging Face) tokenizer by name, which cannot be downloaded offline."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ("tiny-test-sigmoid.json" if family == "siglip" else "tiny-test-clip.json")
    path.write_text(json.dumps(TINY_SIGLIP if family == "siglip" else TINY_CLIP))
    return path
