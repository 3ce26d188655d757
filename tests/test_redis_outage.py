"""Redis killed and restarted under a stream of webhooks, and the backend process restarted
with corrections still spooled: the corrections log ends with every acknowledged event, once
each, in the order Label Studio sent them (the journal's spool bridges the outages)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import REGISTRY

from backend.config import Settings
from backend.corrections.dead_letters import DeadLetters
from backend.corrections.entries import entries_from_webhook
from backend.corrections.journal import Journal
from backend.corrections.records import apply
from backend.store.entry import Entry
from backend.store.redis import RedisStore
from backend.web.app import create_app

from .support.backend_server import BackendThread
from .support.redis_server import RedisServer
from .support.waiting import eventually
from .support.webhooks import annotation_event, choice_result

EVENTS = 1000
OUTAGES: dict[int, Callable[[RedisServer], None]] = {
    200: RedisServer.kill, 400: RedisServer.start, 600: RedisServer.kill, 800: RedisServer.start}
"""Before posting event N: kill Redis (SIGKILL) or start it again on the same port and dir."""
DRAIN_TIMEOUT_S = 60.0


def event(number: int, label: str | None = None, **fields: Any) -> dict[str, Any]:
    """Webhook number N: annotation N on task 10_000 + N, labelled Cat or Dog."""
    result = choice_result(label or ("Cat", "Dog")[number % 2])
    return annotation_event(number, 10_000 + number, result, **fields)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: killing it leaves the session's alone."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def settings(tiny_settings: Settings, own_redis: RedisServer) -> Settings:
    return tiny_settings.model_copy(update={"REDIS_URL": own_redis.url})


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[Journal, httpx.Client]]:
    """One backend process: the real app on a loopback port, and a client for it."""
    with BackendThread(create_app(settings)) as backend, \
            httpx.Client(base_url=backend.url, timeout=30) as client:
        yield backend.app.state.backend.journal, client


def post(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/webhook", json=body)
    assert response.status_code == 200, response.text


def post_range(client: httpx.Client, first: int, last: int) -> None:
    for number in range(first, last + 1):
        post(client, event(number))


def wait_drained(journal: Journal) -> None:
    drained = eventually(lambda: journal.pending == 0, timeout=DRAIN_TIMEOUT_S)
    assert drained, f"{journal.pending} entries still spooled"


def logged(url: str) -> list[str]:
    """Annotation ids in the corrections log, oldest first."""
    store = RedisStore(url)
    try:
        return [logged_event["annotation"] for logged_event in store.events()]
    finally:
        store.close()


def numbers(first: int, last: int) -> list[str]:
    return [str(number) for number in range(first, last + 1)]


def test_redis_killed_twice_under_1000_webhooks_loses_and_duplicates_nothing(
        own_redis: RedisServer, settings: Settings) -> None:
    with serving(settings) as (journal, client):
        for number in range(1, EVENTS + 1):
            if number in OUTAGES:
                OUTAGES[number](own_redis)
            post(client, event(number))
        wait_drained(journal)
        spooled = journal.spooled_total
    assert spooled >= 400  # everything posted while Redis was down went through the spool
    assert logged(own_redis.url) == numbers(1, EVENTS)
    store = RedisStore(own_redis.url)
    records = list(store.corrections())
    store.close()
    assert sorted(int(record["annotation"]) for record in records) == list(range(1, EVENTS + 1))


def test_redelivered_and_updated_webhooks_give_one_record_and_two_events(
        own_redis: RedisServer, settings: Settings) -> None:
    created = event(7)  # Dog
    updated = event(7, "Cat", action="ANNOTATION_UPDATED",
                    updated_at="2026-11-28T12:09:00.000000Z")
    with serving(settings) as (_, client):
        for body in (created, created, updated, created):  # redelivered, also after the update
            post(client, body)
    store = RedisStore(own_redis.url)
    events, records = list(store.events()), list(store.corrections())
    store.close()
    assert [e["action"] for e in events] == ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    assert [e["result"][0]["value"]["choices"] for e in events] == [["Dog"], ["Cat"]]
    [record] = records
    assert record["annotation"] == "7"
    assert record["controls"]["choice"]["final"] == ["Cat"]
    assert record["updated_at"] == "2026-11-28T12:09:00.000000Z"


def crash_mid_replay(own_redis: RedisServer, spool: Path) -> None:
    """What a process that crashed while replaying its spool leaves behind: the first entries
    applied but the offset never saved, and the entry it was appending cut short."""
    lines = spool.read_bytes().splitlines(keepends=True)
    own_redis.start()
    store = RedisStore(own_redis.url)
    for line in lines[:10]:
        apply(store, Entry.from_json(line.decode()))
    store.close()
    own_redis.kill()
    with spool.open("ab") as torn:
        torn.write(lines[-1][: len(lines[-1]) // 2])


def test_a_new_process_replays_the_spool_a_crashed_one_left(
        own_redis: RedisServer, settings: Settings) -> None:
    spool = settings.MODEL_DIR / "spool" / "spool-0.jsonl"  # the first process takes slot 0
    with serving(settings) as (journal, client):
        post_range(client, 1, 10)
        own_redis.kill()
        post_range(client, 11, 40)
        assert journal.pending == 30
    crash_mid_replay(own_redis, spool)
    with serving(settings) as (journal, client):
        assert journal.pending == 30  # counted from the spool file; the torn line is no entry
        post_range(client, 41, 50)  # spooled behind the earlier ones, Redis still down
        own_redis.start()
        wait_drained(journal)
    assert logged(own_redis.url) == numbers(1, 50)
    assert not spool.exists()


def test_an_offset_left_without_its_spool_is_dropped(
        own_redis: RedisServer, settings: Settings) -> None:
    """A crash between removing a replayed spool and removing its offset file."""
    spool_dir = settings.MODEL_DIR / "spool"
    spool_dir.mkdir(parents=True)
    (spool_dir / "spool-0.offset").write_text("1000000")
    own_redis.kill()
    with serving(settings) as (journal, client):
        post_range(client, 1, 5)
        own_redis.start()
        wait_drained(journal)
    assert logged(own_redis.url) == numbers(1, 5)


def test_processes_sharing_model_dir_spool_separately(tmp_path: Path) -> None:
    """WORKERS > 1 share MODEL_DIR: each process's journal gets a spool file of its own."""
    store = RedisStore("redis://127.0.0.1:9/0", timeout_s=0.2)
    first, second = Journal(store, tmp_path / "spool"), Journal(store, tmp_path / "spool")
    assert first.path != second.path
    first.stop()
    third = Journal(store, tmp_path / "spool")  # a restarted worker takes the freed slot
    assert third.path == first.path
    second.stop()
    third.stop()


def malformed(number: int) -> Entry:
    """An annotation entry that got past an older backend's checks: its region names its control
    with a list, so building its correction record fails however often it is retried."""
    (entry,) = entries_from_webhook(event(number))
    data = {**entry.data, "result": [{"from_name": ["choice"], "value": {"choices": ["Cat"]}}]}
    return Entry(entry.kind, entry.key, entry.project, data, entry.received_at)


def entries(*numbers: int) -> list[Entry]:
    return [entry for number in numbers for entry in entries_from_webhook(event(number))]


def spooled_gauge() -> float | None:
    return REGISTRY.get_sample_value("backend_spooled_entries")


@contextmanager
def journal_on(url: str, spool: Path) -> Iterator[Journal]:
    store = RedisStore(url, timeout_s=0.5)
    journal = Journal(store, spool, retry_s=0.05)
    journal.start()
    try:
        yield journal
    finally:
        journal.stop()
        store.close()


def test_a_spooled_entry_that_can_never_be_applied_is_set_aside_and_blocks_nothing(
        own_redis: RedisServer, tmp_path: Path) -> None:
    own_redis.kill()
    with journal_on(own_redis.url, tmp_path / "spool") as journal:
        journal.write([*entries(1), malformed(2), *entries(3)])
        assert journal.pending == 3 and spooled_gauge() == 3
        own_redis.start()
        wait_drained(journal)
        assert journal.alive and spooled_gauge() == 0
        journal.write(entries(4))  # straight to the store again
    assert logged(own_redis.url) == ["1", "3", "4"]
    [letter] = DeadLetters(tmp_path / "spool").read()
    assert letter["entry"]["data"]["annotation"] == "2"
    assert letter["reason"].startswith("TypeError: ") and "unhashable" in letter["reason"]
    with journal_on(own_redis.url, tmp_path / "spool") as journal:  # a restart: nothing to replay
        assert journal.pending == 0
    assert len(DeadLetters(tmp_path / "spool").read()) == 1


def test_an_entry_the_store_cannot_apply_is_set_aside_when_written_directly_too(
        own_redis: RedisServer, tmp_path: Path) -> None:
    with journal_on(own_redis.url, tmp_path / "spool") as journal:
        journal.write([*entries(1), malformed(2), *entries(3)])
        assert journal.pending == 0
    assert logged(own_redis.url) == ["1", "3"]
    [letter] = DeadLetters(tmp_path / "spool").read()
    assert letter["entry"]["data"]["annotation"] == "2" and "TypeError" in letter["reason"]


def fill_memory(server: RedisServer) -> Callable[[], None]:
    """Redis at its maxmemory (noeviction): every write is refused with OOM."""
    client = redis.Redis(port=server.port)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    return lambda: client.config_set("maxmemory", 0) and None


def break_persistence(server: RedisServer) -> Callable[[], None]:
    """An RDB snapshot that failed (its directory is gone): writes are refused with MISCONF."""
    client = redis.Redis(port=server.port)
    client.config_set("save", "3600 1")
    shutil.rmtree(server.directory)
    client.bgsave()
    assert eventually(lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err")
    return lambda: client.config_set("save", "") and None


@pytest.mark.parametrize("refuse", [fill_memory, break_persistence], ids=["OOM", "MISCONF"])
def test_a_redis_that_refuses_writes_is_waited_for_and_nothing_is_set_aside(
        own_redis: RedisServer, tmp_path: Path,
        refuse: Callable[[RedisServer], Callable[[], None]]) -> None:
    with journal_on(own_redis.url, tmp_path / "spool") as journal:
        journal.write(entries(1))
        allow = refuse(own_redis)
        try:
            journal.write(entries(2, 3))  # refused: spooled, not lost and not dead-lettered
            assert journal.pending == 2 and spooled_gauge() == 2
        finally:
            allow()  # (a Redis whose snapshot failed would not even shut down)
        journal.write(entries(4))  # behind the spooled ones
        wait_drained(journal)
    assert logged(own_redis.url) == numbers(1, 4)
    assert DeadLetters(tmp_path / "spool").read() == []


def test_a_crashed_replay_thread_is_restarted_and_counted(
        own_redis: RedisServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "dead-letters.jsonl").mkdir(parents=True)  # setting a line aside fails: a crash
    own_redis.kill()
    restarts = REGISTRY.get_sample_value("backend_spool_replay_restarts_total") or 0.0
    with journal_on(own_redis.url, spool) as journal:
        journal.write([*entries(1), malformed(2), *entries(3)])
        own_redis.start()
        journal.write(entries(4))  # wakes the replay
        assert eventually(lambda: journal.restarts >= 1)
        assert journal.alive and journal.pending == 3  # entry 1 applied, the rest kept
        assert REGISTRY.get_sample_value("backend_spool_replay_restarts_total") > restarts
        (spool / "dead-letters.jsonl").rmdir()
        journal.write(entries(5))
        wait_drained(journal)
    assert logged(own_redis.url) == ["1", "3", "4", "5"]
    assert len(DeadLetters(spool).read()) == 1
