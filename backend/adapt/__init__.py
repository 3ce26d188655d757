"""Corrections → fitted, calibrated adapters versioned as heads; `score`: zero-shot or adapted."""

from .adapter import Adapter, Scored, score, zero_shot_logits
from .examples import collect_examples
from .fit import MIN_EXAMPLES, Examples, Fit, adapt
from .registry import ZERO_SHOT_SERVED, HeadId, HeadRegistry, ServedHead
from .trainer import Run, Trainer, fit_project

__all__ = [
    "MIN_EXAMPLES", "ZERO_SHOT_SERVED", "Adapter", "Examples", "Fit", "HeadId", "HeadRegistry",
    "Run", "Scored", "ServedHead", "Trainer", "adapt", "collect_examples", "fit_project", "score",
    "zero_shot_logits",
]
