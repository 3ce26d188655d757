"""Serving the micro-CLIP testbed: its settings, a config over its 25 labels, PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from backend.config import Settings, load_settings

from .microclip import LABELS, ZERO_SHOT_TEMPLATES, MicroClip


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def choices_config(name: str = "choice", extra: str = "") -> str:
    """A single <Choices> over all 25 testbed labels ("red circle", …)."""
    choices = "".join(f'<Choice value="{label}"/>' for label in LABELS)
    return (f'<View><Image name="image" value="$image"/>'
            f'<Choices name="{name}" toName="image" {extra}>{choices}</Choices></View>')


def serving_settings(micro_clip: MicroClip, model_dir: Path, **overrides: Any) -> Settings:
    """Settings serving the micro CLIP with its zero-shot template, images from 127.0.0.1.
    Said explicitly: module-scoped fixtures run before the per-test environment is set."""
    return load_settings(MODEL_CONFIG=micro_clip.config_path,
                         MODEL_PRETRAINED=str(micro_clip.checkpoint_path),
                         TEMPLATES="|".join(ZERO_SHOT_TEMPLATES), IMAGE_URL_ALLOWLIST="127.0.0.1",
                         MODEL_DIR=model_dir, **overrides)
