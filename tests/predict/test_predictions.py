"""Decisions and Label Studio JSON, validated by label-studio-sdk's own prediction validator."""

from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.label_config import parse_label_config
from backend.predict.predictions import decide, empty_prediction, region_id, task_prediction

EXAMPLES = Path(__file__).resolve().parents[2] / "label_config"


def outcome(config: str, probs, scoring="softmax", control=0):
    space = parse_label_config(config).spaces[control]
    return decide(space, np.asarray(probs, dtype=float), scoring, 3, "r1")


def valid(config: str, prediction: dict) -> bool:
    stored = {key: prediction[key] for key in ("result", "score", "model_version")}
    return LabelInterface(config).validate_prediction(stored)


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def test_single_choice_region_is_valid_label_studio_json():
    config = example("choices_single.xml")
    result = outcome(config, [0.1, 0.7, 0.15, 0.05])
    prediction = task_prediction([result], "m:v1")
    assert prediction["score"] == 0.7 and prediction["model_version"] == "m:v1"
    region = prediction["result"][0]
    assert region["value"] == {"choices": ["Dog"]} and region["type"] == "choices"
    assert region["top_k"] == [{"label": "Dog", "score": 0.7}, {"label": "Bird", "score": 0.15},
                               {"label": "Cat", "score": 0.1}]
    assert valid(config, prediction)


def test_single_choice_abstains_below_threshold_but_keeps_its_score():
    config = example("choices_single.xml").replace('choice="single"', 'model_score_threshold="0.8"')
    result = outcome(config, [0.1, 0.7, 0.15, 0.05])
    assert result.region is None and result.score == 0.7


def test_multiple_choice_threshold_and_relative_default():
    config = example("choices_multiple.xml")  # threshold 0.2
    result = outcome(config, [0.5, 0.25, 0.1, 0.1, 0.05], scoring="sigmoid")
    assert result.region["value"] == {"choices": ["Person", "Car"]}
    assert result.score == 0.25  # the weakest chosen label
    assert valid(config, task_prediction([result], "v"))
    relative = config.replace(' model_score_threshold="0.2"', "")
    chosen = outcome(relative, [0.08, 0.05, 0.03, 0.01, 0.02], scoring="sigmoid").region["value"]
    assert chosen == {"choices": ["Person", "Car"]}  # ≥ half of the top score


def test_taxonomy_paths_back_off_and_leafs_only():
    config = example("taxonomy.xml")  # threshold 0.4, leaves: A/Cat A/Dog T/Cat T/Ball V/Car V/Bicycle
    confident = outcome(config, [0.1, 0.5, 0.1, 0.1, 0.1, 0.1])
    assert confident.region["value"] == {"taxonomy": [["Animal", "Dog"]]}
    assert confident.region["top_k"][0] == {"label": ["Animal", "Dog"], "score": 0.5}
    assert valid(config, task_prediction([confident], "v"))
    unsure = outcome(config, [0.3, 0.25, 0.1, 0.1, 0.15, 0.1])  # no leaf ≥ 0.4, Animal = 0.55
    assert unsure.region["value"] == {"taxonomy": [["Animal"]]} and unsure.score == 0.55
    sigmoid = outcome(config, [0.3, 0.25, 0.1, 0.1, 0.15, 0.1], scoring="sigmoid")
    assert sigmoid.region is None  # independent scores don't add up
    leafs_only = config.replace('model_score_threshold="0.4"', 'model_score_threshold="0.4" leafsOnly="true"')
    assert outcome(leafs_only, [0.3, 0.25, 0.1, 0.1, 0.15, 0.1]).region is None


def test_multi_control_prediction_score_is_the_weakest_control():
    config = example("multi_control.xml")
    outcomes = [outcome(config, [0.9, 0.1], control=0),
                outcome(config, [0.6, 0.2, 0.2], control=1),
                outcome(config, [0.1, 0.2, 0.65, 0.05], control=2)]
    prediction = task_prediction(outcomes, "v")
    assert prediction["score"] == 0.6
    assert [r["from_name"] for r in prediction["result"]] == ["front_view", "back_objects", "scene"]
    assert prediction["result"][2]["value"] == {"taxonomy": [["City", "Street"]]}
    assert valid(config, prediction)


def test_scores_are_clipped_to_unit_interval():
    config = example("choices_single.xml")
    assert outcome(config, [1.0000001, 0, 0, 0]).score == 1.0


def test_failed_task_placeholder_is_skipped_by_label_studio():
    placeholder = empty_prediction("v", "task 3: FetchError: HTTP 404")
    assert "result" not in placeholder and placeholder["error"].startswith("task 3")


def test_region_ids_are_stable():
    assert region_id(5, "c", "v") == region_id(5, "c", "v") != region_id(6, "c", "v")
    assert len(region_id(5, "c", "v")) == 10


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.xml")))
def test_every_example_gives_valid_predictions(name):
    config = example(name)
    parsed = parse_label_config(config)
    outcomes = [decide(space, np.linspace(1, 2, len(space.labels)) / np.linspace(1, 2, len(space.labels)).sum(),
                       "softmax", 5, f"r{i}") for i, space in enumerate(parsed.spaces)]
    assert valid(config, task_prediction(outcomes, "v"))
