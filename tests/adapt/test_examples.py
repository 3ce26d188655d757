"""collect_examples on a real store: what each kind of correction record becomes, and the
store round trips it costs (one embeddings read for all records, whatever their number)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from backend.adapt.examples import collect_examples
from backend.adapt.fit import normalise_rows
from backend.labelstudio.label_config import parse_label_config
from backend.store import Store
from backend.store.base import Vector

from ..support.counting_store import count_calls

MODEL = "m"
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image">'
          '<Choice value="cat"/><Choice value="dog"/><Choice value="bird"/></Choices></View>')
SPACE = parse_label_config(CONFIG).spaces[0]


def vector(seed: int) -> Vector:
    return np.random.default_rng(seed).standard_normal(8).astype(np.float32)


def record(number: int, final: list[Any] | None, key: str | None, **extra: Any) -> dict[str, Any]:
    control = {"final": final, "embedding_key": key, "image_ref": f"http://images/{number}.png"}
    return {"task": str(number), "annotation": f"a{number}", "controls": {"c": control},
            "received_at": 1000.0 + number, **extra}


def stored_records(store: Store, count: int) -> list[dict[str, Any]]:
    """`count` usable corrections, each with a stored embedding of the model."""
    records = [record(n, [["cat", "dog", "bird"][n % 3]], f"{MODEL}|{n}") for n in range(count)]
    store.put_embeddings([(f"{MODEL}|{n}", vector(n), None) for n in range(count)])
    return records


@pytest.mark.parametrize("count", [1, 10, 60])
def test_one_store_read_for_all_records(store: Store, count: int) -> None:
    records = stored_records(store, count)
    calls = count_calls(store)
    examples, skipped = collect_examples(store, records, SPACE, MODEL)
    assert calls == {"embeddings": 1}
    assert examples is not None and len(examples) == count and skipped == {}


def test_no_embeddings_read_without_a_key(store: Store) -> None:
    """Records without the model's key are looked up by image reference (one call each, as
    before); none found: no embeddings read at all."""
    calls = count_calls(store)
    records = [record(1, ["cat"], None), record(2, None, f"{MODEL}|2"), record(3, ["cat"], "")]
    assert collect_examples(store, records, SPACE, MODEL) == (
        None, {"no cached embedding": 2, "control left empty": 1})
    assert calls == {"embedding_key_for": 2}


def test_each_kind_of_record_as_before(store: Store) -> None:
    """Usable records keep their order and embeddings; the others are counted by reason, in
    the order each reason first occurs."""
    store.put_embeddings([(f"{MODEL}|{n}", vector(n), None) for n in (1, 4, 5, 6, 9)])
    # an image embedded under another model's key, found again by its reference
    store.put_embeddings([(f"{MODEL}|new7", vector(7), "http://images/7.png")])
    records = [
        record(0, ["cat"], f"{MODEL}|0"),  # not stored
        record(1, ["dog"], f"{MODEL}|1"),
        record(2, ["cat"], f"{MODEL}|1", deleted_at=5.0),
        record(3, ["cat"], f"{MODEL}|1", was_cancelled=True),
        record(4, ["cat", "dog"], f"{MODEL}|4"),  # two labels, single choice
        record(5, ["lion"], f"{MODEL}|5"),
        record(6, ["bird"], f"{MODEL}|6"),
        record(7, ["cat"], "old-model|7"),
        record(8, ["cat"], "old-model|8"),  # no reference recorded for this model
        record(9, [], f"{MODEL}|9"),
        record(10, ["dog"], f"{MODEL}|1"),  # the same image as record 1
    ]
    expected_vectors = [store.get_embedding(key) for key in
                        (f"{MODEL}|1", f"{MODEL}|6", f"{MODEL}|new7", f"{MODEL}|1")]
    examples, skipped = collect_examples(store, records, SPACE, MODEL)
    assert list(skipped.items()) == [
        ("no cached embedding", 2), ("deleted", 1), ("skipped by the annotator", 1),
        ("several labels on a single-choice control", 1), ("label not in the config", 1),
        ("control left empty", 1)]
    assert examples is not None
    assert np.array_equal(examples.vectors,
                          normalise_rows(np.stack(expected_vectors).astype(np.float64)))
    assert examples.labels.tolist() == [1, 2, 0, 1]
    assert examples.updated.tolist() == [1001.0, 1006.0, 1007.0, 1010.0]
