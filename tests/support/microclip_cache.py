"""A cached micro-CLIP is checked before the tests use it; a stale, partial or corrupt one is
trained again instead of failing every test that uses it.

Kept out of microclip.py on purpose: that file's bytes are part of the cache key, so editing
it retrains every cached testbed (about an hour on two busy cores).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import open_clip
import torch

from .microclip import DEFAULT_RECIPES, MicroClip, ensure_micro_clip, model_config

log = logging.getLogger(__name__)


def cache_problem(mc: MicroClip) -> str | None:
    """Why the cached files cannot serve the tests (None: they can)."""
    try:
        if json.loads(mc.config_path.read_text()) != model_config(mc.family, DEFAULT_RECIPES[mc.family]):
            return "its config differs from the recipe's"
        state = torch.load(mc.checkpoint_path, map_location="cpu", weights_only=True)
        # strict: every tensor of the architecture, with its shape
        open_clip.add_model_config(str(mc.config_path))
        open_clip.create_model(mc.model_name, pretrained=None).load_state_dict(state)
    except Exception as exc:  # missing, unreadable, truncated or foreign files
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if mc.family == "siglip" and "logit_bias" not in state:
        return "a SigLIP checkpoint without logit_bias"
    if not all(torch.isfinite(tensor).all() for tensor in state.values()):
        return "weights that are not all finite"
    return None


def ensure_usable_micro_clip(cache_dir: Path, family: str = "clip") -> MicroClip:
    """ensure_micro_clip, and a cached model the tests could not use is trained again."""
    mc = ensure_micro_clip(cache_dir, family)
    problem = cache_problem(mc)
    if problem is None:
        return mc
    log.warning("micro-CLIP cache %s is unusable (%s): training it again", mc.checkpoint_path,
                problem)
    mc.checkpoint_path.unlink(missing_ok=True)
    mc = ensure_micro_clip(cache_dir, family)
    problem = cache_problem(mc)
    if problem is not None:
        raise RuntimeError(f"micro-CLIP trained again in {cache_dir} is still unusable "
                           f"({problem}): delete that directory and run the tests again")
    return mc
