"""Continuous batching in plain Python (no torch): which tokens of which requests run in the next forward pass.

Each step spends a token budget: running requests first, those with a single token to run (decodes) before
those in the middle of a prefill, then waiting requests in arrival order, their prompts cut into chunks that fit
the budget. Requests from several peers (Request.peer) are admitted round robin, the peer with the fewest running
requests first, so that one client's backlog does not keep another's request waiting behind it. When blocks run out, the newest running request is preempted by recompute: its blocks are freed,
its counter goes back to zero and it waits at the head of the queue, keeping the tokens it has generated. The
oldest request therefore always progresses, and a request whose prompt + max_new_tokens fits the pool always
finishes.

With prefix caching, a waiting request starts from the longest cached prefix of full blocks of its tokens (shared,
never written: engine.block_manager), its counter set past them, so that only the rest runs; blocks are offered to the
cache once their K/V are written (`update`). Cached tokens cost no budget; counts of queried and hit tokens are kept
for metrics (vLLM's prefix_cache_queries and prefix_cache_hits), and each request keeps its first admission's count.

Paused requests (their client is not reading) are never scheduled and never hold what a reading request needs:
they keep their blocks and batch slot only while nobody else wants them. They are the first victims of
preemption, both when blocks run out and when a waiting request finds the batch full; a paused request that waits
is skipped by admission until it is resumed.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = False
    cache_salt: str = ""  # what makes blocks of the same tokens incompatible (engine.block_manager)


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens to run, at positions start .. start + len - 1
    start: int  # = the request's num_computed_tokens before this step
    block_ids: list[int]  # the request's whole block table, covering start + len tokens
    sample: bool  # this chunk ends the known tokens: sample the next one from its last position


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching,
                                   config.cache_salt)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found cached
        self.paused: set[str] = set()  # running requests whose client is behind: kept, not scheduled
        self._arrival: dict[str, int] = {}
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self._arrival[request.request_id] = next(self._counter)
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_runnable(self) -> bool:
        """Something to schedule: a request, waiting or running, that is not paused."""
        return any(r.request_id not in self.paused for r in (*self.waiting, *self.running))

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """Ends a request (stop condition, abort); frees its blocks. None when it is not in the scheduler."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        del self._arrival[request_id]
        self.paused.discard(request_id)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.blocks.free(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        return request

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[str] = []
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if request.status is not RequestStatus.RUNNING or num_new <= 0 or request.request_id in self.paused:
                continue
            while not self.blocks.can_allocate(request.request_id, request.num_computed_tokens + num_new):
                victim = max(self.running, key=lambda r: (r.request_id in self.paused, self._arrival[r.request_id]))
                budget += self._preempt(victim, scheduled)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                scheduled[request.request_id] = self._schedule(request, num_new)
                budget -= num_new
        if not preempted:
            budget = self._admit_waiting(budget, scheduled, preempted)
        return SchedulerOutput(list(scheduled.values()), preempted)

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advances the counters of what ran, appends the sampled tokens; returns the requests that finished."""
        finished = []
        for item in output.scheduled:
            request = self.requests.get(item.request_id)
            if request is None:
                continue
            request.num_computed_tokens += len(item.token_ids)
            self.blocks.commit(item.request_id, request.token_ids, request.num_computed_tokens)
            if not item.sample:
                continue
            token = sampled[item.request_id]
            request.token_ids.append(token)
            reason = request.stop_reason(token, self.config.max_model_len)
            if reason is not None:
                finished.append(self.finish(item.request_id, reason))
        return finished

    def _admit_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest], preempted: list[str]) -> int:
        """Admits waiting requests in admission order while the budget, the batch and the blocks allow, preempting
        paused running requests to make room."""
        for request in self._admission_order():
            cached = self.blocks.lookup(request.request_id, request.token_ids)
            computed = len(cached) * self.config.block_size
            num_new = min(request.num_tokens - computed, budget)
            if num_new <= 0 or not self._make_room(request, computed + num_new, cached, preempted):
                break
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._start_from_cache(request, computed)
            scheduled[request.request_id] = self._schedule(request, num_new, cached)
            budget -= num_new
        return budget

    def _admission_order(self) -> list[Request]:
        """The waiting requests that may run (paused ones skipped), fair across peers: round robin, a peer with fewer
        running requests first, each peer's requests in queue order. With one peer: the queue's order."""
        running = Counter(r.peer for r in self.running)
        ahead: Counter[str] = Counter()  # the peer's requests already ranked
        ranked = []
        for position, request in enumerate(self.waiting):
            if request.request_id not in self.paused:
                ranked.append((running[request.peer] + ahead[request.peer], position, request))
                ahead[request.peer] += 1
        return [request for *_, request in sorted(ranked, key=lambda entry: entry[:2])]

    def _start_from_cache(self, request: Request, computed: int) -> None:
        """An admitted request's counter starts after its cached tokens; hits are counted."""
        request.num_computed_tokens = computed
        if request.num_cached_tokens is None:
            request.num_cached_tokens = computed
        if self.config.enable_prefix_caching:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += computed

    def _make_room(self, request: Request, num_tokens: int, cached: list[int], preempted: list[str]) -> bool:
        """A batch slot and the blocks for `request` to hold `num_tokens` tokens from its cached blocks on,
        preempting paused running requests (newest first) if need be."""
        while (len(self.running) >= self.config.max_num_seqs
               or not self.blocks.can_allocate(request.request_id, num_tokens, cached)):
            paused = [r for r in self.running if r.request_id in self.paused]
            if not paused:
                return False
            victim = max(paused, key=lambda r: self._arrival[r.request_id])
            self._preempt(victim, {})
            preempted.append(victim.request_id)
        return True

    def _schedule(self, request: Request, num_new: int, cached: list[int] = ()) -> ScheduledRequest:
        start = request.num_computed_tokens
        self.blocks.allocate(request.request_id, start + num_new, cached)
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + num_new],
            start=start,
            block_ids=list(self.blocks.table(request.request_id)),
            sample=start + num_new == request.num_tokens,
        )

    def _preempt(self, victim: Request, scheduled: dict[str, ScheduledRequest]) -> int:
        """Preempts by recompute; returns the tokens refunded to the budget if the victim was scheduled."""
        self.running.remove(victim)
        self.blocks.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        undone = scheduled.pop(victim.request_id, None)
        return len(undone.token_ids) if undone else 0

    def check_invariants(self) -> None:
        self.blocks.check_invariants()
        assert len(self.running) <= self.config.max_num_seqs
        assert {r.request_id for r in self.running} | {r.request_id for r in self.waiting} == set(self.requests)
        assert not {r.request_id for r in self.running} & {r.request_id for r in self.waiting}
        for request in self.running:
            assert request.status is RequestStatus.RUNNING
            held = len(self.blocks.table(request.request_id))
            assert held == self.blocks.blocks_for(request.num_computed_tokens), "blocks disagree with the counter"
            assert request.num_computed_tokens <= request.num_tokens
        for request in self.waiting:
            assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0
            assert not self.blocks.table(request.request_id), "a waiting request holds blocks"
