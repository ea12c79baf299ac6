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
        blocked = asyncio.create_task(queue.put(None))  # even the end waits for room
        await asyncio.sleep(0.05)
        assert not blocked.done()
        await queue.get()
        await queue.get()
        await asyncio.wait_for(blocked, 1)
        assert await queue.get() is None
        assert queue.bytes == 0 and queue.empty()

    asyncio.run(scenario())
