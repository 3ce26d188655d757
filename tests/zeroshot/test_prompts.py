import pytest

from backend.errors import LabelConfigError
from backend.labelstudio.label_config import parse_label_config
from backend.zeroshot.prompts import TEMPLATE_SETS, plan_prompts, prompt_set_hash, resolve_templates


def space_of(choices: str, attrs: str = ""):
    config = f'<View><Image name="i" value="$i"/><Choices name="c" toName="i" {attrs}>{choices}</Choices></View>'
    return parse_label_config(config).spaces[0]


def test_template_sets_are_open_clips():
    assert len(TEMPLATE_SETS["openai"]) == 80
    assert len(TEMPLATE_SETS["simple"]) == 7
    assert TEMPLATE_SETS["openai"][0] == "a bad photo of a {}."
    assert resolve_templates("photo") == ("a photo of a {}.",)


def test_custom_templates_must_contain_placeholder():
    assert resolve_templates("an x-ray of {}.| a scan of {} ") == ("an x-ray of {}.", "a scan of {}")
    with pytest.raises(LabelConfigError, match="each containing"):
        resolve_templates("a photo")


def test_names_times_templates_plus_verbatim_prompts():
    space = space_of('<Choice value="Dog" predicted_values="dog,puppy" model_prompts="a dog on a leash"/>'
                     '<Choice value="Cat"/>')
    plan = plan_prompts(space, "photo")
    assert plan.groups == (("a photo of a dog.",), ("a photo of a puppy.",), ("a dog on a leash",),
                           ("a photo of a Cat.",))
    assert plan.group_label == (0, 0, 0, 1)


def test_control_templates_override_the_default_and_braces_in_names_are_safe():
    space = space_of('<Choice value="{weird}"/>', 'model_templates="an image of {}."')
    assert plan_prompts(space, "openai").groups == (("an image of {weird}.",),)


def test_texts_are_distinct_prompts_in_order():
    space = space_of('<Choice value="a"/><Choice value="b" predicted_values="a"/>')
    plan = plan_prompts(space, "simple")
    assert len(plan.texts) == 7 and len(plan.groups) == 2  # "b" looks for "a": shared prompts


def test_prompt_hash_tracks_templates_and_labels():
    space = space_of('<Choice value="a"/><Choice value="b"/>')
    base = prompt_set_hash([plan_prompts(space, "simple")], (space,))
    assert base == prompt_set_hash([plan_prompts(space, "simple")], (space,))
    assert base != prompt_set_hash([plan_prompts(space, "openai")], (space,))
    assert len(base) == 8


def test_prompt_count_is_what_the_plan_holds_counted_without_building_it():
    from backend.zeroshot.prompts import prompt_count

    space = space_of('<Choice value="Dog" predicted_values="dog,puppy" model_prompts="a dog|hound"/>'
                     '<Choice value="Cat"/>')
    plan = plan_prompts(space, "simple")
    assert prompt_count([space], "simple") == sum(len(group) for group in plan.groups) == 3 * 7 + 2


def test_a_config_over_the_prompt_limit_is_refused_with_the_count_the_limit_and_the_fix():
    from backend.zeroshot.prompts import check_prompt_count

    space = space_of("".join(f'<Choice value="l{i}"/>' for i in range(100)), 'model_templates="openai"')
    check_prompt_count([space], "simple", 8_000)  # 100 x 80 = 8,000: at the limit is fine
    with pytest.raises(LabelConfigError) as caught:
        check_prompt_count([space], "simple", 7_999)
    message = str(caught.value)
    assert "expands to 8000 prompts" in message and "MAX_PROMPTS_PER_CONFIG=7999" in message
    assert 'model_templates="simple"' in message
