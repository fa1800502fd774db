"""The bounded queue between the archive writer and the engine's HTTP body: whatever the
writer hands over at once, what is queued is copies of at most ``CHUNK`` bytes, so the queue
never holds more than ``QUEUE_CHUNKS * CHUNK`` bytes. The engine itself is exercised in
tests/test_docker_images.py."""

from __future__ import annotations

import os
import queue
import threading

import pytest

from ova2img.errors import SinkError
from ova2img.sinks.docker import CHUNK, QUEUE_CHUNKS, _Answer, _QueueStream


def test_large_writes_are_queued_as_bounded_copies() -> None:
    q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
    stream = _QueueStream(q, _Answer(), "unix:///nowhere")
    pieces: list[bytes] = []

    def consume() -> None:
        while (item := q.get()) is not None:
            assert isinstance(item, bytes)
            pieces.append(item)

    reader = threading.Thread(target=consume)
    reader.start()
    data = os.urandom(5 * CHUNK + 123)
    buf = bytearray(data)
    assert stream.write(memoryview(buf)) == len(data)
    buf[:] = bytes(len(buf))  # the writer reuses its buffer: the queue holds copies
    assert stream.write(b"tail") == 4
    q.put(None)
    reader.join(10)
    assert [len(p) for p in pieces] == [CHUNK] * 5 + [123, 4]
    assert b"".join(pieces) == data + b"tail"
    assert stream.bytes == len(data) + 4


def test_a_writer_blocked_on_a_full_queue_learns_that_the_engine_stopped() -> None:
    q: queue.Queue[object] = queue.Queue(maxsize=QUEUE_CHUNKS)
    answer = _Answer()
    stream = _QueueStream(q, answer, "unix:///nowhere")
    answer.status = 500
    answer.messages.append({"message": "no space left on device"})
    threading.Timer(0.3, answer.done.set).start()
    with pytest.raises(SinkError, match="stopped reading: no space left on device"):
        stream.write(bytes((QUEUE_CHUNKS + 1) * CHUNK))
    assert q.qsize() == QUEUE_CHUNKS
