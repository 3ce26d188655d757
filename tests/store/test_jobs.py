"""The pre-label job ledger: the same contract on the embedded SQLite store and on Redis."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from backend.jobs.prelabel import progress
from backend.jobs.work import claim, new_owner
from backend.store.jobs import JobLedger, open_ledger
from backend.store.redis import RedisStore
from backend.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", "redis"])
def ledger(request: pytest.FixtureRequest, tmp_path) -> Iterator[JobLedger]:
    store = (SqliteStore(tmp_path / "store.sqlite3") if request.param == "sqlite"
             else RedisStore(request.getfixturevalue("redis_url"), prefix="test"))
    yield open_ledger(store)
    store.close()


def test_fields_merge_and_counts_come_from_tasks(ledger):
    ledger.update("j1", "3", {"id": "j1", "project": "3", "model_version": "v", "seen": 0})
    ledger.update("j1", "3", {"seen": 10, "planning": "done"})
    ledger.finish("j1", ["1", "2"], {"3": "HTTP 404 from http://img/3.png"})
    record = ledger.get("j1")
    assert record["seen"] == 10 and record["model_version"] == "v"
    assert (record["done"], record["failed"]) == (2, 1)
    assert ledger.failures("j1") == {"3": "HTTP 404 from http://img/3.png"}
    assert ledger.done("j1") == {"1", "2"}
    assert [job["id"] for job in ledger.jobs("3")] == ["j1"] and ledger.jobs("4") == []
    assert ledger.get("nope") is None


def test_a_task_done_later_is_no_longer_failed_and_done_wins(ledger):
    ledger.update("j", "1", {"id": "j"})
    ledger.finish("j", [], {"7": "timed out"})
    ledger.finish("j", ["7"], {})
    ledger.finish("j", [], {"7": "a late, stale failure"})  # done stays done
    assert ledger.done("j") == {"7"} and ledger.failures("j") == {}
    ledger.finish("j", [], {"8": "x"})
    ledger.clear_failures("j")
    assert ledger.get("j")["failed"] == 0 and ledger.done("j") == {"7"}


def test_claims_are_exclusive_until_released_or_expired(ledger):
    ledger.update("j", "1", {"id": "j"})
    assert ledger.claim("j", ["1", "2"], "a", 60) == ["1", "2"]
    assert ledger.claim("j", ["2", "3"], "b", 60) == ["3"]
    assert ledger.claim("j", ["1"], "a", 60) == ["1"]  # renewing one's own claim
    assert ledger.holders("j", ["1", "2", "3", "4"]) == {"1": "a", "2": "a", "3": "b"}
    ledger.release("j", ["1", "3"], "a")  # "3" is b's: untouched
    assert ledger.holders("j", ["1", "3"]) == {"3": "b"}
    assert ledger.claim("j", ["5"], "a", 0.05) == ["5"]
    time.sleep(0.15)
    assert ledger.claim("j", ["5"], "b", 60) == ["5"]  # a's claim expired


def test_done_tasks_cannot_be_claimed_and_finishing_frees_claims(ledger):
    ledger.update("j", "1", {"id": "j"})
    ledger.claim("j", ["1", "2"], "a", 60)
    ledger.finish("j", ["1"], {"2": "broken image"})
    assert ledger.holders("j", ["1", "2"]) == {}
    assert ledger.claim("j", ["1", "2"], "b", 60) == ["2"]  # failed tasks are retried


def test_claims_of_a_dead_process_on_this_machine_are_taken_over_at_once(ledger):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = new_owner().split(":")[0]
    ledger.update("j", "1", {"id": "j"})
    ledger.claim("j", ["1"], f"{host}:{dead}:abcdef", 300)
    ledger.claim("j", ["2"], f"{host}:1:abcdef", 300)  # pid 1 lives
    ledger.claim("j", ["3"], f"elsewhere:{dead}:abcdef", 300)  # another machine: wait
    assert claim(ledger, "j", ["1", "2", "3"], new_owner(), 300) == ["1"]


def test_progress_counts_skipped_as_done_and_reports_status():
    base = {"id": "j", "project": "1", "model_version": "v", "total": 10}
    assert progress({**base, "planning": "running", "seen": 4, "done": 4})["status"] == "running"
    done = progress({**base, "planning": "done", "seen": 10, "done": 9, "failed": 1})
    assert (done["status"], done["queued"], done["failed"]) == ("done", 0, 1)
    assert progress({**base, "error": "x"})["status"] == "failed"
    assert progress({**base, "cancelled": True})["status"] == "cancelled"
