"""Image embeddings → per-label probabilities for one control.

The rule follows the model family, as the weights were trained:
- CLIP: `softmax(logit_scale · cos)` over the control's labels;
- SigLIP: `sigmoid(logit_scale · cos + logit_bias)` per label, independent of the others.
A control may override it with `model_scoring` (e.g. softmax over a SigLIP model's candidates).

Labels with several prompt groups (names, verbatim prompts) pool them by the control's
`model_pooling`: `mean` averages the group embeddings into one label embedding (open_clip's
ensembling, one level up); `max` lets the best-matching group speak for the label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from ..labelstudio.label_config import LabelSpace, Pooling, Scoring

Probs = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ZeroShotHead:
    """The zero-shot classifier of one control.

    weights: (G, D) float32, L2-normalised rows; `group_label[g]` is the label row g votes for.
    With mean pooling G == L and group_label is the identity.
    """

    weights: torch.Tensor
    group_label: torch.Tensor
    n_labels: int
    pooling: Pooling
    scoring: Scoring
    logit_scale: float
    logit_bias: float


def build_head(groups: torch.Tensor, group_label: tuple[int, ...], space: LabelSpace,
               family: str, logit_scale: float, logit_bias: float | None) -> ZeroShotHead:
    """`groups`: (G, D) ensembled, normalised embeddings of the control's prompt groups."""
    owners = torch.tensor(group_label, dtype=torch.long)
    n_labels = len(space.labels)
    if space.pooling == "mean":
        summed = torch.zeros(n_labels, groups.shape[1]).index_add_(0, owners, groups)
        groups, owners = _normalise(summed), torch.arange(n_labels)
    scoring: Scoring = space.scoring or ("sigmoid" if family == "siglip" else "softmax")
    return ZeroShotHead(groups, owners, n_labels, space.pooling, scoring, logit_scale,
                logit_bias if logit_bias is not None and scoring == "sigmoid" else 0.0)


def label_logits(head: ZeroShotHead, images: torch.Tensor) -> torch.Tensor:
    """(N, D) normalised image embeddings → (N, L) label logits."""
    logits = head.logit_scale * images @ head.weights.T + head.logit_bias
    if head.pooling == "mean":
        return logits
    index = head.group_label.expand(logits.shape[0], -1)
    pooled = torch.full((logits.shape[0], head.n_labels), -torch.inf)
    best: torch.Tensor = pooled.scatter_reduce(1, index, logits, reduce="amax")
    return best


def probabilities(head: ZeroShotHead, images: torch.Tensor) -> Probs:
    """(N, D) normalised image embeddings → (N, L) float64 probabilities in [0, 1]."""
    logits = label_logits(head, images.float()).double()
    if head.scoring == "softmax":
        return torch.softmax(logits, dim=1).numpy()
    return torch.sigmoid(logits).numpy()


def ensemble(prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(T, D) normalised prompt embeddings → (D,) their normalised mean (open_clip's recipe)."""
    return _normalise(prompt_embeddings.mean(dim=0, keepdim=True))[0]


def _normalise(rows: torch.Tensor) -> torch.Tensor:
    normalised: torch.Tensor = rows / rows.norm(dim=-1, keepdim=True)
    return normalised
