"""The head report and the heads commands, on a store holding one fitted head."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backend.adapt.fit import Examples, adapt
from backend.adapt.trainer import _control_record
from backend.cli import _model_label, main
from backend.config import load_settings
from backend.labelstudio.label_config import parse_label_config
from backend.store.sqlite import SqliteStore
from backend.zeroshot.scoring import ZeroShotHead

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="kind" toName="image">'
          '<Choice value="cat"/><Choice value="dog"/><Choice value="fox"/></Choices></View>')


@pytest.fixture
def stored_head():
    settings = load_settings()
    rng = np.random.default_rng(0)
    text = rng.normal(size=(3, 16))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    y = np.repeat(np.arange(3), 10)
    x = text[y] + rng.normal(size=(30, 16)) * 0.4 + 0.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    head = ZeroShotHead(torch.from_numpy(text).float(), torch.arange(3), 3, "mean", "softmax", 10.0, 0.0)
    examples = Examples(x, np.eye(3)[y], np.zeros(30))
    space = parse_label_config(CONFIG).spaces[0]
    control = _control_record(space, head, examples, adapt(head, examples, False), {})
    store = SqliteStore(settings.MODEL_DIR / "store.sqlite3")
    record = {"project": "7", "model": _model_label(settings), "trigger": "START_TRAINING",
              "created_at": 1_795_000_000.0, "seconds": 0.4, "controls": {"kind": control},
              "not_fitted": {}, "fitted_until": 0.0}
    head_id = store.put_head("7", record)
    store.set_active_head("7", head_id)
    store.close()
    return head_id


def test_report_shows_reliability_learning_curve_and_per_label_numbers(stored_head, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "--project", "7", "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count("<svg") == 2 and "Reliability" in page and "Accuracy vs corrections" in page
    assert all(label in page for label in ("cat", "dog", "fox"))
    assert f"{stored_head} (active)" in page and "zero-shot, calibrated" in page


def test_heads_list_and_rollback_from_the_command_line(stored_head, capsys):
    assert main(["heads", "list", "--project", "7"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["active"] == stored_head and listing["heads"][0]["active"]
    assert "adapter" not in listing["heads"][0]["controls"]["kind"]  # no arrays in listings
    assert main(["heads", "activate", "zero-shot", "--project", "7"]) == 0
    assert main(["heads", "activate", "h9", "--project", "7"]) == 2
    assert "has no head 'h9'" in capsys.readouterr().err
    main(["heads", "list", "--project", "7"])
    assert json.loads(capsys.readouterr().out)["active"] == "zero-shot"


def test_a_project_without_heads_gets_a_report_that_says_so(stored_head, tmp_path):
    out = tmp_path / "empty.html"
    assert main(["report", "--project", "8", "-o", str(out)]) == 0
    assert "serves zero-shot" in out.read_text()

