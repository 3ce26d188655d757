"""Fitting runs: what a published head keeps from the one it replaces."""

from __future__ import annotations

from backend.adapt.registry import space_digest
from backend.adapt.trainer import _carry_over
from backend.labelstudio.label_config import parse_label_config
from backend.store.sqlite import SqliteStore


def test_controls_not_refitted_keep_what_the_current_head_serves(tmp_path):
    config = ('<View><Image name="image" value="$image"/>'
              '<Choices name="a" toName="image"><Choice value="x"/><Choice value="y"/></Choices>'
              '<Choices name="b" toName="image"><Choice value="u"/><Choice value="v"/></Choices></View>')
    parsed = parse_label_config(config)
    store = SqliteStore(tmp_path / "store.sqlite3")
    old = {"space": space_digest(parsed.spaces[1]), "adapter": {"method": "prototypes"}, "accepted": True}
    head = store.put_head("9", {"controls": {"b": old}})
    controls = {"a": {"accepted": True}}
    _carry_over(store, "9", head, parsed, controls)
    assert controls["b"]["carried_over_from"] == head and controls["b"]["adapter"] == old["adapter"]
    assert controls["b"]["accepted"] is False and controls["a"] == {"accepted": True}
    store.close()
