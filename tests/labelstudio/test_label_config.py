from pathlib import Path

import pytest

from backend.errors import LabelConfigError
from backend.labelstudio.label_config import MAX_LABELS, parse_label_config

EXAMPLES = Path(__file__).resolve().parents[2] / "label_config"


def image_config(controls: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return f"<View>{image}{controls}</View>"


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def test_single_choice_example():
    (space,) = parse_label_config(example("choices_single.xml")).spaces
    assert (space.name, space.to_name, space.data_key, space.kind) == ("animal", "image", "image", "choices")
    assert not space.multiple
    assert [label.value for label in space.labels] == ["Cat", "Dog", "Bird", "Horse"]
    assert space.labels[0].names == ("Cat",)


def test_multiple_choice_example_reads_threshold():
    (space,) = parse_label_config(example("choices_multiple.xml")).spaces
    assert space.multiple and space.threshold == 0.2


def test_taxonomy_example_paths_parents_and_disambiguation():
    (space,) = parse_label_config(example("taxonomy.xml")).spaces
    assert space.kind == "taxonomy" and not space.multiple and not space.leafs_only
    assert [label.path for label in space.labels] == [
        ("Animal", "Cat"), ("Animal", "Dog"), ("Toy", "Cat"), ("Toy", "Ball"),
        ("Vehicle", "Car"), ("Vehicle", "Bicycle"),
    ]
    assert space.parents == (("Animal",), ("Toy",), ("Vehicle",))
    # two leaves called "Cat": prompted with their whole path so the model can tell them apart
    assert space.labels[0].names == ("Animal Cat",) and space.labels[2].names == ("Toy Cat",)
    assert space.labels[1].names == ("Dog",)


def test_prompt_attributes_example():
    (space,) = parse_label_config(example("prompts_and_synonyms.xml")).spaces
    ok, scratch, dent = space.labels
    assert ok.names == ("a flawless surface", "a clean product")
    assert scratch.value == "SCR" and scratch.names == ("a scratch", "scratches")
    assert dent.prompts == ("a photo of a dented metal sheet", "a product with a dent in it")
    assert space.pooling == "max"
    assert space.templates == "a close-up photo of {}.|a photo of a {} on a product."


def test_multi_control_example_nested_views_two_images_and_skipped_controls():
    parsed = parse_label_config(example("multi_control.xml"))
    assert [(s.name, s.to_name, s.data_key, s.multiple) for s in parsed.spaces] == [
        ("front_view", "front", "front", False),
        ("back_objects", "back", "back", True),
        ("scene", "front", "front", False),
    ]
    assert parsed.spaces[2].leafs_only
    assert parsed.skipped == ("<TextArea name='notes'>: only Choices and Taxonomy are supported",)


def test_scoring_override_example():
    (space,) = parse_label_config(example("siglip_softmax.xml")).spaces
    assert space.scoring == "softmax" and space.templates == "photo"


def test_every_example_config_is_tested():
    tested = {"choices_single.xml", "choices_multiple.xml", "taxonomy.xml",
              "prompts_and_synonyms.xml", "multi_control.xml", "siglip_softmax.xml"}
    assert {path.name for path in EXAMPLES.glob("*.xml")} == tested


def test_alias_is_the_value_label_studio_stores():
    config = image_config('<Choices name="c" toName="image"><Choice value="Kitty" alias="cat"/></Choices>')
    (label,) = parse_label_config(config).spaces[0].labels
    assert label.value == "cat" and label.names == ("cat",)


def test_taxonomy_max_usages_makes_it_multi_label():
    config = image_config('<Taxonomy name="t" toName="image" maxUsages="3"><Choice value="A"/>'
                          '<Choice value="B"/></Taxonomy>')
    (space,) = parse_label_config(config).spaces
    assert space.multiple and space.max_labels == 3


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>',
         "toName must name exactly one <Image> tag"),
        (image_config('<RectangleLabels name="r" toName="image"><Label value="a"/></RectangleLabels>'),
         "only Choices and Taxonomy are supported"),
        (image_config('<Choices name="c" toName="image" value="$options"/>'),
         "labels loaded from task data"),
        (image_config('<Choices name="c" toName="image" perRegion="true"><Choice value="a"/></Choices>'),
         "per-region"),
        (image_config('<Choices name="c" toName="image"><Choice value="a"/></Choices>',
                      '<Image name="image" valueList="$images"/>'), "valueList"),
    ],
)
def test_unsupported_configs_say_what_is_supported(config, message):
    with pytest.raises(LabelConfigError) as caught:
        parse_label_config(config)
    assert message in str(caught.value)
    if message not in ("empty", "not valid XML"):
        assert "Supported: <Choices>" in str(caught.value)


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ('model_score_threshold="1.5"', "must be a number in [0, 1]"),
        ('model_score_threshold="high"', "must be a number in [0, 1]"),
        ('model_scoring="argmax"', "use one of softmax, sigmoid"),
        ('model_pooling="sum"', "use one of mean, max"),
    ],
)
def test_bad_control_attributes_are_named(attrs, message):
    config = image_config(f'<Choices name="c" toName="image" {attrs}><Choice value="a"/></Choices>')
    with pytest.raises(LabelConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_label_config(config)


def test_label_set_and_prompt_limits():
    huge = "".join(f'<Choice value="l{i}"/>' for i in range(MAX_LABELS + 1))
    with pytest.raises(LabelConfigError, match="the limit is 10000"):
        parse_label_config(image_config(f'<Choices name="c" toName="image">{huge}</Choices>'))
    long_prompt = "x" * 1001
    with pytest.raises(LabelConfigError, match="limit is 1000"):
        parse_label_config(image_config(
            f'<Choices name="c" toName="image"><Choice value="a" model_prompts="{long_prompt}"/></Choices>'))


def test_digest_changes_with_anything_that_changes_predictions():
    base = image_config('<Choices name="c" toName="image"><Choice value="a"/><Choice value="b"/></Choices>')
    renamed = base.replace('value="b"', 'value="c"')
    prompted = base.replace('value="b"', 'value="b" model_prompts="a b"')
    digests = {parse_label_config(c).digest() for c in (base, renamed, prompted)}
    assert len(digests) == 3
    assert parse_label_config(base).digest() == parse_label_config(base + " ").digest()


def test_parsed_configs_are_cached_by_digest_without_keeping_their_text():
    """256 configs of up to 64 MiB each were kept whole: about 16 GiB at worst."""
    import tracemalloc

    controls = '<Choices name="c" toName="image"><Choice value="a"/><Choice value="b"/></Choices>'
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(8):
            config = image_config(controls) + f"<!-- {i} {'x' * 1_000_000} -->"
            first = parse_label_config(config)
            assert parse_label_config(config) is first  # cached
            del config
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 2_000_000, f"{kept} bytes kept after parsing 8 configs of 1 MB"
