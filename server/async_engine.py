"""The engine thread and its asyncio bridge.

One thread owns the LLMEngine: it takes commands (add, abort, pause, resume) from a queue, runs step() while
anything is runnable, and hands each step's outputs to the event loop in one call_soon_threadsafe. Each RPC reads
its request's outputs from its own asyncio.Queue; outputs that piled up are sent as one message. Backpressure: when a
client falls HIGH_WATER outputs behind, its request is paused in the engine (never scheduled; its KV blocks and
batch slot go to any request that needs them, see engine/scheduler.py) and resumed once the client is within
LOW_WATER. Leaving the `generate` iterator for any reason other than the final output (client cancel, deadline,
slow client, server stop) sends an abort, which the engine applies before its next step. A request that fails alone
in a step (RequestOutput.error) gets that error; a command the engine cannot apply fails only its request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext

from engine.engine import LLMEngine, StepFailed
from engine.errors import CapacityExceeded, EngineUnavailable, RequestFailed
from engine.request import Request, RequestOutput, merge_outputs

log = logging.getLogger(__name__)


HIGH_WATER, LOW_WATER = 32, 4  # outputs queued for one RPC: pause the request / resume it


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_pending: int, on_fatal: Callable[[], None] = lambda: None,
                 step_span: Callable[[], AbstractContextManager] = nullcontext, max_tokens_in_flight: int = 0,
                 max_pending_per_peer: int = 0):
        """`on_fatal` runs on the event loop if the engine thread dies; `step_span()` wraps each engine step."""
        self.engine = engine
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer  # 0 = no limit
        self.on_fatal = on_fatal
        self.step_span = step_span
        self.max_tokens_in_flight = max_tokens_in_flight  # 0 = no limit
        self.accepting = False
        self.dead = False
        self.pauses = 0
        self._paused: set[str] = set()
        self._tokens: dict[str, int] = {}  # prompt + max_new_tokens of each pending request
        self._peers: Counter[str] = Counter()  # pending requests of each peer
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
        """Admits the request and yields its outputs; the last one has finish_reason set. One peer (Request.peer)
        holds at most max_pending_per_peer of the pending requests, so that it cannot refuse every other."""
        peer = request.peer
        if self.dead or not self.accepting:
            raise EngineUnavailable("the engine is not serving (starting, draining or stopped)")
        if len(self._queues) >= self.max_pending:
            raise CapacityExceeded(f"{len(self._queues)} requests pending (limit {self.max_pending})")
        if self.max_pending_per_peer and self._peers[peer] >= self.max_pending_per_peer:
            raise CapacityExceeded(f"{self._peers[peer]} requests pending from {peer or 'this peer'} (limit "
                                   f"{self.max_pending_per_peer} a peer, --max-pending-per-peer)")
        tokens = request.num_prompt_tokens + request.stopping.max_new_tokens
        in_flight = sum(self._tokens.values())
        if self.max_tokens_in_flight and in_flight + tokens > self.max_tokens_in_flight:
            raise CapacityExceeded(f"{in_flight} tokens in flight; this request needs {tokens} "
                                   f"(limit {self.max_tokens_in_flight})")
        self._tokens[request.request_id] = tokens
        self._peers[peer] += 1
        try:
            async for output in self.run(request):
                yield output
        finally:
            del self._tokens[request.request_id]
            self._peers[peer] -= 1
            if not self._peers[peer]:
                del self._peers[peer]

    async def run(self, request: Request) -> AsyncIterator[RequestOutput]:
        """generate() without the admission checks (warm-up)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._submit("add", request)
        ended = False
        try:
            while not ended:
                items = [await queue.get()]
                while not queue.empty() and not isinstance(items[-1], BaseException):
                    items.append(queue.get_nowait())
                self._maybe_resume(request.request_id, queue)
                if isinstance(items[-1], BaseException):
                    ended = True
                    raise items[-1]
                output = merge_outputs(items)
                ended = output.finished
                yield output
        finally:
            del self._queues[request.request_id]
            self._paused.discard(request.request_id)
            if not ended:
                self._submit("abort", request.request_id)

    def _maybe_resume(self, request_id: str, queue: asyncio.Queue) -> None:
        if request_id in self._paused and queue.qsize() <= LOW_WATER:
            self._paused.discard(request_id)
            self._submit("resume", request_id)

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
            while not self._commands and not self._stop and not self.engine.scheduler.has_runnable():
                self._wake.wait()
            commands, stop = list(self._commands), self._stop
            self._commands.clear()
        for kind, payload in commands:
            self._apply(kind, payload)
        if stop:
            for request_id in list(self.engine.scheduler.requests):
                self.engine.abort(request_id)
            return False
        if self.engine.scheduler.has_runnable():
            self._step()
        return True

    def _apply(self, kind: str, payload) -> None:
        try:
            if kind == "add":
                self.engine.add_request(payload)
            elif kind == "abort":
                self.engine.abort(payload)
            else:
                self.engine.pause(payload, kind == "pause")
        except Exception:
            log.exception("engine command %r failed", kind)
            if kind == "add":  # Scheduler.add checks before it changes anything
                self._post([(payload.request_id, RequestFailed("the engine could not admit this request"))])

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
        self._post([(out.request_id, out.error or out) for out in outputs])

    def _post(self, items: list[tuple[str, object]]) -> None:
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        for request_id, item in items:
            queue = self._queues.get(request_id)
            if queue is None:  # the RPC ended; its abort is on the way
                continue
            queue.put_nowait(item)
            if queue.qsize() >= HIGH_WATER and request_id not in self._paused:
                self._paused.add(request_id)
                self.pauses += 1
                self._submit("pause", request_id)
