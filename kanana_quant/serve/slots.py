"""Slots and the request queue. A slot is one engine instance with its own KV cache and a worker thread;
`--parallel N` opens N of them. llama.cpp and onnxruntime engines each run in their own child process
(runtimes.isolated), so N slots decode N sequences at the same time on different cores; numpy slots share
this process (numpy releases the GIL inside its matrix products).

Requests wait in a bounded queue; when it is full, `submit` raises QueueFull and the client gets a 503 with
Retry-After. A waiting request goes to the free slot whose cache shares the longest prefix with its prompt
(a chat's next turn lands where its history already is). A cancelled request leaves the queue, or stops
at its next token and frees its slot."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from typing import Callable, Protocol, Sequence

from kanana_quant.errors import EngineCrashed
from kanana_quant.runtimes.generate import Engine, common_prefix
from kanana_quant.runtimes.isolated import IsolatedEngine

log = logging.getLogger("kanana_quant.serve")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"all slots are busy and {retry_after} s is the expected wait")
        self.retry_after = retry_after


class Slot:
    def __init__(self, index: int, engine: Engine):
        self.index, self.engine = index, engine
        self.cached: list[int] = []  # the ids whose keys and values are in the engine's cache
        self.inbox: queue.Queue = queue.Queue(maxsize=1)
        self.busy = False


class Job(Protocol):
    prompt_ids: Sequence[int]
    cancelled: threading.Event

    def run(self, slot: Slot) -> BaseException | None: ...  # the failure it reported to its client, if any


class SlotPool:
    def __init__(self, open_engine: Callable[[], Engine], parallel: int, max_queue: int):
        self._open = open_engine
        self.slots = [Slot(i, open_engine()) for i in range(parallel)]
        self.max_queue = max_queue
        self._waiting: deque = deque()
        self._lock = threading.Lock()
        self._seconds = 5.0  # running mean of a request's time in a slot, for Retry-After
        self._closed = False
        self._threads = [threading.Thread(target=self._work, args=(s,), name=f"slot-{s.index}", daemon=True)
                         for s in self.slots]
        for t in self._threads:
            t.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._waiting) >= self.max_queue and not any(not s.busy for s in self.slots):
                waits = (len(self._waiting) + 1) / len(self.slots)
                raise QueueFull(max(1, min(60, math.ceil(self._seconds * waits))))
            self._waiting.append(job)
            self._dispatch()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict:
        with self._lock:
            return {"slots": len(self.slots), "busy": sum(s.busy for s in self.slots), "queued": len(self._waiting)}

    def close(self) -> None:
        self._closed = True
        for slot in self.slots:
            slot.inbox.put(None)
        for t in self._threads:
            t.join(timeout=10)
        for slot in self.slots:
            if isinstance(slot.engine, IsolatedEngine):  # ends its child process
                slot.engine.close()

    def _dispatch(self) -> None:
        """Give waiting jobs (oldest first) to free slots, each to the free slot that has most of its prompt
        cached. Called with the lock held."""
        while self._waiting:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            slot = max(free, key=lambda s: common_prefix(s.cached, job.prompt_ids))
            slot.busy = True
            slot.inbox.put(job)

    def _work(self, slot: Slot) -> None:
        while True:
            job = slot.inbox.get()
            if job is None:
                return
            started = time.monotonic()
            failure = job.run(slot)
            if isinstance(failure, EngineCrashed):
                log.error("slot %d: %s; reopening its engine", slot.index, failure)
                slot.cached = []
                try:
                    slot.engine = self._open()
                except Exception:  # the engine cannot come back: this slot stays out of service
                    log.exception("slot %d: cannot reopen the engine", slot.index)
                    return
            with self._lock:
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - started)
                slot.busy = False
                if not self._closed:
                    self._dispatch()
