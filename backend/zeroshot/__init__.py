"""open_clip zero-shot: loading the encoder, the inference thread, prompts, heads, scoring."""

from .encoder import Encoder, ModelSpec, load_encoder
from .heads import HeadCache
from .inference import BACKGROUND, FOREGROUND, InferenceThread
from .loader import EncoderHost, ModelState
from .prompts import PromptPlan, plan_prompts
from .scoring import ZeroShotHead, label_logits, probabilities

__all__ = ["BACKGROUND", "FOREGROUND", "Encoder", "EncoderHost", "HeadCache", "InferenceThread",
           "ModelSpec", "ModelState", "PromptPlan", "ZeroShotHead", "label_logits", "load_encoder",
           "plan_prompts", "probabilities"]
