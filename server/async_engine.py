"""The engine thread and its asyncio bridge.

One thread owns the LLMEngine: it takes commands (add, abort) from a queue, runs step() while anything is
unfinished, and hands each step's outputs to the event loop in one call_soon_threadsafe. Each RPC reads its
request's outputs from its own asyncio.Queue. Leaving the `generate` iterator for any reason other than the final
output (client cancel, deadline, server stop) sends an abort, which the engine applies before its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext

from engine.engine import LLMEngine, StepFailed
from engine.errors import CapacityExceeded, EngineUnavailable
from engine.request import Request, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_pending: int, on_fatal: Callable[[], None] = lambda: None,
                 step_span: Callable[[], AbstractContextManager] = nullcontext):
        """`on_fatal` runs on the event loop if the engine thread dies; `step_span()` wraps each engine step."""
        self.engine = engine
        self.max_pending = max_pending
        self.on_fatal = on_fatal
        self.step_span = step_span
        self.accepting = False
        self.dead = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._commands: deque[tuple[str, object]] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def num_pending(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="certkv-engine", daemon=True)
        self._thread.start()

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Admits the request and yields its outputs; the last one has finish_reason set."""
        if self.dead or not self.accepting:
            raise EngineUnavailable("the engine is not serving (starting, draining or stopped)")
        if len(self._queues) >= self.max_pending:
            raise CapacityExceeded(f"{len(self._queues)} requests pending (limit {self.max_pending})")
        async for output in self.run(request):
            yield output

    async def run(self, request: Request) -> AsyncIterator[RequestOutput]:
        """generate() without the admission checks (warm-up)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._submit("add", request)
        ended = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                ended = item.finished
                yield item
                if ended:
                    return
        finally:
            del self._queues[request.request_id]
            if not ended:
                self._submit("abort", request.request_id)

    async def shutdown(self) -> None:
        """Stops admitting, aborts whatever is left in the engine, joins the thread and fails open streams."""
        self.accepting = False
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        for queue in self._queues.values():
            queue.put_nowait(EngineUnavailable("the server stopped"))

    def _submit(self, kind: str, payload: object) -> None:
        with self._wake:
            self._commands.append((kind, payload))
            self._wake.notify()

    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except Exception:
            log.exception("engine thread died")
            self.dead = True
            self._post([(rid, EngineUnavailable("the engine failed")) for rid in list(self._queues)])
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self.on_fatal)

    def _iterate(self) -> bool:
        with self._wake:
            while not self._commands and not self._stop and not self.engine.has_unfinished():
                self._wake.wait()
            commands, stop = list(self._commands), self._stop
            self._commands.clear()
        for kind, payload in commands:
            if kind == "add":
                self.engine.add_request(payload)
            else:
                self.engine.abort(payload)
        if stop:
            for request_id in list(self.engine.scheduler.requests):
                self.engine.abort(request_id)
            return False
        if self.engine.has_unfinished():
            self._step()
        return True

    def _step(self) -> None:
        try:
            with self.step_span() as span:
                outputs = self.engine.step()
                if span is not None:
                    span.set_attributes({"requests": len(outputs), "running": len(self.engine.scheduler.running),
                                         "waiting": len(self.engine.scheduler.waiting),
                                         "escalations": sum(len(out.escalations) for out in outputs)})
        except StepFailed as exc:
            log.error("engine step failed for %d requests", len(exc.errors))
            self._post(list(exc.errors.items()))
            return
        self._post([(out.request_id, out) for out in outputs])

    def _post(self, items: list[tuple[str, object]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            queue = self._queues.get(request_id)
            if queue is not None:  # the RPC may have ended; its abort is on the way
                queue.put_nowait(item)
