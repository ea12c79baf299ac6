"""The secondary's apply queue is bounded by the memory its batches take, not by their count."""

from __future__ import annotations

import asyncio

from replicator.protocol import BlobChunk
from replicator.secondary import EVENT_MEMORY, _Batch, _BatchQueue


def test_the_queue_holds_its_bytes_plus_one_batch_and_any_batch_when_empty():
    async def scenario() -> None:
        queue = _BatchQueue(1 << 20)
        huge = _Batch([BlobChunk(b"x")], 64 << 20)  # a 64 MiB record: taken, the queue being empty
        await asyncio.wait_for(queue.put(huge), 1)
        put = asyncio.create_task(queue.put(_Batch([BlobChunk(b"y")], 10)))
        await asyncio.sleep(0.05)
        assert not put.done()  # full: the reader waits, and TCP pushes back on the primary
        assert await queue.get() is huge
        await asyncio.wait_for(put, 1)
        assert queue.bytes == 10 + EVENT_MEMORY
        # Many small events weigh what they take decoded, not their few bytes on the wire.
        tiny = _Batch([BlobChunk(b"z")] * 10_000, 50_000)
        await asyncio.wait_for(queue.put(tiny), 1)
        assert queue.bytes == 10 + EVENT_MEMORY + 50_000 + 10_000 * EVENT_MEMORY
        assert queue.full()
        queue.end()  # the end never waits for room: it comes after what is queued
        assert await queue.get() is not None
        assert await queue.get() is tiny
        assert await queue.get() is None
        assert queue.bytes == 0 and queue.empty()

    asyncio.run(scenario())


def test_a_connection_that_ends_while_the_applier_fails_on_a_full_queue_does_not_hang():
    """The applier takes a batch and fails (a full disk, say) while the reader filled the queue
    and the connection ended: the session queues the end and waits for the applier, which is
    over, instead of waiting for room that nothing will ever make."""

    async def scenario() -> None:
        queue = _BatchQueue(1000)

        async def applier() -> None:
            await queue.get()
            await asyncio.sleep(0.05)
            raise OSError(28, "No space left on device")

        async def reader() -> None:  # the second batch waits until the applier took the first
            for _ in range(2):
                await queue.put(_Batch([BlobChunk(b"x")], 2000))

        applying = asyncio.create_task(applier())
        await asyncio.wait_for(reader(), 1)  # then the connection ends
        assert queue.full() and not applying.done()
        queue.end()
        try:
            await asyncio.wait_for(applying, 1)
        except OSError as exc:
            assert exc.errno == 28
        else:
            raise AssertionError("the applier was meant to fail")

    asyncio.run(scenario())
