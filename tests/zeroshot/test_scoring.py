import numpy as np
import pytest
import torch

from backend.labelstudio.label_config import parse_label_config
from backend.zeroshot.prompts import plan_prompts
from backend.zeroshot.scoring import build_head, ensemble, label_logits, probabilities


def space(choices: str, attrs: str = ""):
    config = f'<View><Image name="i" value="$i"/><Choices name="c" toName="i" {attrs}>{choices}</Choices></View>'
    return parse_label_config(config).spaces[0]


def unit(*values: float) -> torch.Tensor:
    vector = torch.tensor(values, dtype=torch.float32)
    return vector / vector.norm()


TWO_NAMES = '<Choice value="a" predicted_values="x,y"/><Choice value="b"/>'
GROUPS = torch.stack([unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)])  # x, y → a ; b


def test_ensemble_is_normalised_mean():
    out = ensemble(torch.stack([unit(1, 0), unit(0, 1)]))
    torch.testing.assert_close(out, unit(1, 1))


def test_mean_pooling_averages_names_into_one_label_embedding():
    s = space(TWO_NAMES)
    head = build_head(GROUPS, plan_prompts(s, "photo").group_label, s, "clip", 10.0, None)
    assert head.weights.shape == (2, 3)
    torch.testing.assert_close(head.weights[0], unit(1, 1, 0))


def test_max_pooling_lets_the_best_name_speak():
    s = space(TWO_NAMES, 'model_pooling="max"')
    head = build_head(GROUPS, plan_prompts(s, "photo").group_label, s, "clip", 10.0, None)
    logits = label_logits(head, torch.stack([unit(0, 1, 0), unit(0, 0, 1)]))
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0], [0.0, 10.0]]))


def test_clip_softmax_and_siglip_sigmoid_with_bias():
    s = space('<Choice value="a"/><Choice value="b"/>')
    images = torch.stack([unit(1, 0), unit(1, 1)])
    groups = torch.stack([unit(1, 0), unit(0, 1)])
    clip = build_head(groups, (0, 1), s, "clip", 100.0, None)
    probs = probabilities(clip, images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs[0, 0] > 0.99 and probs[1, 0] == pytest.approx(0.5)
    siglip = build_head(groups, (0, 1), s, "siglip", 10.0, -10.0)
    expected = torch.sigmoid(torch.tensor(10.0 * 1.0 - 10.0)).item()
    assert siglip.scoring == "sigmoid"
    assert probabilities(siglip, images)[0, 0] == pytest.approx(expected)  # 0.5: cos 1, bias -10
    assert probabilities(siglip, images)[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(-10.0)).item())


def test_control_can_override_the_family_rule():
    s = space('<Choice value="a"/><Choice value="b"/>', 'model_scoring="softmax"')
    head = build_head(torch.stack([unit(1, 0), unit(0, 1)]), (0, 1), s, "siglip", 10.0, -10.0)
    assert head.scoring == "softmax" and head.logit_bias == 0.0
    assert probabilities(head, unit(1, 0)[None]).sum() == pytest.approx(1.0)
