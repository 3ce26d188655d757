import asyncio
import os
import sys
import threading

import pytest
import torch

from backend.zeroshot.inference import InferenceThread


class Doubler:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.shape[0])
        self.threads.add(threading.current_thread().name)
        return batch * 2


def test_concurrent_requests_share_batches_and_get_their_own_rows():
    model = Doubler()
    worker = InferenceThread(max_batch=4, wait_s=0.05)
    worker.start()

    async def run():
        # a fresh bound method per call, as `encoder.encode_images` is in the backend
        return await asyncio.gather(*(worker.encode(model.encode, torch.tensor([float(i)]))
                                      for i in range(10)))

    try:
        rows = asyncio.run(run())
    finally:
        worker.stop(5)
    assert [row.item() for row in rows] == [2.0 * i for i in range(10)]
    assert max(model.batches) == 4 and sum(model.batches) == 10 and len(model.batches) < 10
    assert model.threads == {"inference"}


def test_calls_run_on_the_worker_and_errors_reach_every_waiter():
    worker = InferenceThread(max_batch=8, wait_s=0.01)
    worker.start()

    def broken(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of memory")

    async def run():
        name = await worker.call(lambda: threading.current_thread().name)
        results = await asyncio.gather(*(worker.encode(broken, torch.zeros(1)) for _ in range(3)),
                                       return_exceptions=True)
        return name, results

    try:
        name, results = asyncio.run(run())
    finally:
        worker.stop(5)
    assert name == "inference"
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)


def test_stop_finishes_queued_work():
    worker = InferenceThread(max_batch=2, wait_s=0.0)
    futures = [worker.submit(lambda i=i: i * 3) for i in range(5)]
    worker.start()
    worker.stop(5)
    assert [f.result(timeout=1) for f in futures] == [0, 3, 6, 9, 12]


def test_batch_cap_must_be_positive():
    with pytest.raises(ValueError):
        InferenceThread(max_batch=0, wait_s=0)


def test_label_studio_requests_overtake_queued_background_work():
    """A pre-label job's images wait behind a request's, not the other way round: only the
    batch already running is finished first."""
    from backend.zeroshot.inference import BACKGROUND, FOREGROUND

    seen: list[float] = []
    gate = threading.Event()
    worker = InferenceThread(max_batch=2, wait_s=0.0)

    def encode(batch: torch.Tensor) -> torch.Tensor:
        gate.wait(5)
        seen.extend(batch.flatten().tolist())
        return batch

    async def run():
        running = asyncio.ensure_future(worker.encode(encode, torch.tensor([0.0]), BACKGROUND))
        await asyncio.sleep(0.05)  # the worker holds item 0, blocked on the gate
        queued = [asyncio.ensure_future(worker.encode(encode, torch.tensor([float(i)]),
                                                      BACKGROUND)) for i in (1, 2, 3, 4)]
        await asyncio.sleep(0.01)
        urgent = asyncio.ensure_future(worker.encode(encode, torch.tensor([9.0]), FOREGROUND))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(running, urgent, *queued)

    worker.start()
    try:
        asyncio.run(run())
    finally:
        worker.stop(5)
    assert seen[0] == 0.0 and seen[1] == 9.0 and sorted(seen[2:]) == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_the_inference_thread_and_the_threads_it_starts_yield_the_cpu_to_the_event_loop():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def started_thread() -> int:
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(niceness()))
        thread.start()
        thread.join()
        return seen[0]

    caller = niceness()
    worker = InferenceThread(max_batch=1, wait_s=0, nice=3)
    worker.start()
    try:
        own = worker.submit(niceness).result(5)
        assert own == min(19, caller + 3) and worker.submit(started_thread).result(5) == own
    finally:
        worker.stop(5)
    assert niceness() == caller  # the caller's own priority is untouched


def test_a_large_label_set_is_encoded_in_calls_that_other_requests_images_run_between(
        tiny_settings):
    """One /setup with many prompts must not hold the inference thread for all of them: an
    image queued while the first part is encoded runs before the next part."""
    from PIL import Image

    from backend.runtime import Backend
    from backend.zeroshot.heads import PROMPTS_PER_CALL

    labels = "".join(f'<Choice value="label {i}"/>' for i in range(2 * PROMPTS_PER_CALL + 1))
    config = ('<View><Image name="i" value="$i"/><Choices name="c" toName="i" '
              f'model_templates="photo">{labels}</Choices></View>')
    order: list[str] = []

    async def run():
        model = Backend(tiny_settings)
        model.start()
        encoder = await model.wait_ready()
        loop = asyncio.get_running_loop()
        first_part, release = asyncio.Event(), threading.Event()
        encode_texts, encode_images = encoder.encode_texts, encoder.encode_images

        def texts(prompts):
            order.append("texts")
            if len(order) == 1:
                loop.call_soon_threadsafe(first_part.set)
                release.wait(60)
            return encode_texts(prompts)

        def images(pixels):
            order.append("images")
            return encode_images(pixels)

        encoder.encode_texts = texts
        try:
            setup = asyncio.ensure_future(model.context(config))
            await first_part.wait()  # the inference thread is encoding the first part
            image = asyncio.ensure_future(
                model.inference.encode(images, encoder.preprocess(Image.new("RGB", (32, 32)))))
            await asyncio.sleep(0)  # a yield, not a wait: the image job is queued now
            release.set()
            await asyncio.gather(setup, image)
        finally:
            await model.aclose()

    asyncio.run(run())
    assert order == ["texts", "images", "texts", "texts"]
