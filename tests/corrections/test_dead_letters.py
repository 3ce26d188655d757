"""Dead letters: spooled entries the store could never apply, set aside with their reason,
exported, fixed by hand and replayed with the CLI into the real (embedded) store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.cli import main
from backend.config import load_settings
from backend.corrections.dead_letters import DeadLetters
from backend.corrections.entries import entries_from_webhook
from backend.store.entry import Entry
from backend.store.sqlite import SqliteStore

from ..support.webhooks import annotation_event, choice_result


def broken(number: int) -> Entry:
    """Annotation `number` with its control named by a list: no store can apply it."""
    (entry,) = entries_from_webhook(annotation_event(number, 100 + number, choice_result("Cat")))
    result = [{**entry.data["result"][0], "from_name": ["choice"]}]
    return Entry(entry.kind, entry.key, entry.project, {**entry.data, "result": result})


@pytest.fixture
def spool() -> Path:
    """The backend's spool directory, beside an existing embedded store."""
    settings = load_settings()
    SqliteStore(settings.MODEL_DIR / "store.sqlite3").close()
    return settings.MODEL_DIR / "spool"


def logged() -> list[str]:
    store = SqliteStore(load_settings().MODEL_DIR / "store.sqlite3")
    try:
        return [event["annotation"] for event in store.events()]
    finally:
        store.close()


def test_a_line_that_is_not_an_entry_is_kept_as_it_was(tmp_path: Path):
    letters = DeadLetters(tmp_path)
    letters.add(b'{"kind": "annot\n', "JSONDecodeError: Unterminated string")
    [letter] = letters.read()
    assert letter["entry"] is None and letter["line"] == '{"kind": "annot'
    assert letter["reason"] == "JSONDecodeError: Unterminated string" and letter["dead_at"] > 0


def test_dead_letters_are_exported_fixed_and_replayed_into_the_store(spool, tmp_path, capsys):
    DeadLetters(spool).add(broken(1).to_json().encode() + b"\n", "TypeError: unhashable type")
    DeadLetters(spool).add(broken(2).to_json().encode() + b"\n", "TypeError: unhashable type")
    assert main(["replay", "dead-letters"]) == 2  # unfixed: they fail again and stay
    assert "result[0].from_name is a list" in capsys.readouterr().err
    assert len(DeadLetters(spool).read()) == 2 and logged() == []

    exported = tmp_path / "letters.jsonl"
    assert main(["export", "dead-letters", "-o", str(exported)]) == 0
    letters = [json.loads(line) for line in exported.read_text().splitlines()]
    letters[0]["entry"]["data"]["result"][0]["from_name"] = "choice"  # the operator's fix
    exported.write_text("".join(json.dumps(letter) + "\n" for letter in letters))
    assert main(["replay", "dead-letters", "--input", str(exported)]) == 2  # one still broken
    assert logged() == ["1"]
    [left] = DeadLetters(spool).read()
    assert left["entry"]["data"]["annotation"] == "2"
    assert "applied 1 dead letters" in capsys.readouterr().err


def test_replaying_a_file_that_is_not_dead_letters_says_so(spool, tmp_path, capsys):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("not json\n")
    assert main(["replay", "dead-letters", "--input", str(wrong)]) == 2
    assert f"{wrong}:1 is not JSON" in capsys.readouterr().err
