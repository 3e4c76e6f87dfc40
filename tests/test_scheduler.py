"""Scheduler with no model: a fake runner replays every scheduled chunk and checks the positions it gets."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from hypothesis import strategies as st

from engine.request import FinishReason, Request, RequestStatus, SamplingParams, StoppingParams
from engine.scheduler import Scheduler, SchedulerConfig

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, max_len=512):
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, num_blocks, block_size))


def make_request(rid, prompt_len, max_new=8, min_new=0):
    prompt = [100 + (hash((rid, i)) % 50) for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(), StoppingParams(max_new, min_new), eos_token_ids=(EOS,))


class FakeRunner:
    """Checks that every request sees each of its tokens exactly once per (re)computation, in order."""

    def __init__(self, scheduler, eos_rate=0.0, seed=0):
        self.scheduler = scheduler
        self.seen: dict[str, list[int]] = {}
        self.rng = random.Random(seed)
        self.eos_rate = eos_rate

    def step(self):
        out = self.scheduler.schedule()
        for rid in out.preempted:
            self.seen[rid] = []
        assert out.num_tokens <= self.scheduler.config.max_num_batched_tokens
        assert len(out.scheduled) <= self.scheduler.config.max_num_seqs
        sampled = {}
        for item in out.scheduled:
            request = self.scheduler.requests[item.request_id]
            seen = self.seen.setdefault(item.request_id, [])
            assert item.start == len(seen), "a chunk does not continue where the last one stopped"
            seen.extend(item.token_ids)
            assert seen == request.token_ids[: len(seen)]
            assert len(item.block_ids) * self.scheduler.config.block_size >= len(seen)
            if item.sample:
                sampled[item.request_id] = EOS if self.rng.random() < self.eos_rate else self.rng.randrange(1, 99)
        finished = self.scheduler.update(out, sampled)
        self.scheduler.check_invariants()
        return out, finished


def run_to_completion(scheduler, runner, max_steps=200_000):
    """Steps until every request ended; liveness: a step with unfinished requests always schedules something."""
    finished = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return finished
        out, done = runner.step()
        assert out.scheduled or out.preempted, "requests are waiting but nothing was scheduled"
        finished += done
    raise AssertionError("scheduler did not drain")


def test_prefill_then_decode():
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 10, max_new=3))
    out = scheduler.schedule()
    (item,) = out.scheduled
    assert (item.start, len(item.token_ids), item.sample) == (0, 10, True)
    scheduler.update(out, {"a": 7})
    out = scheduler.schedule()
    assert [(s.start, s.token_ids) for s in out.scheduled] == [(10, [7])]


def test_chunked_prefill_samples_only_after_the_last_chunk():
    scheduler = make_scheduler(budget=8)
    scheduler.add(make_request("a", 20))
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        chunks += [(s.start, len(s.token_ids), s.sample) for s in out.scheduled]
        scheduler.update(out, {"a": 5})
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert scheduler.requests["a"].num_output_tokens == 1


def test_decodes_go_before_prefill_chunks():
    scheduler = make_scheduler(budget=6)
    for rid in "ab":
        scheduler.add(make_request(rid, 3))
    out = scheduler.schedule()
    scheduler.update(out, {"a": 1, "b": 2})  # both decoding now
    scheduler.add(make_request("c", 30))
    out = scheduler.schedule()
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled] == [("a", 1), ("b", 1), ("c", 4)]


def test_decode_first_even_when_an_older_request_is_prefilling():
    scheduler = make_scheduler(budget=5)
    scheduler.add(make_request("old", 12))
    scheduler.add(make_request("young", 2))
    out = scheduler.schedule()  # old takes the whole budget
    assert [s.request_id for s in out.scheduled] == ["old"]
    scheduler.update(out, {})
    scheduler.add(make_request("x", 1))
    for _ in range(3):
        out = scheduler.schedule()
        scheduler.update(out, {s.request_id: 9 for s in out.scheduled if s.sample})
    decoding = [s for s in scheduler.schedule().scheduled if s.start > 0 and len(s.token_ids) == 1]
    assert decoding, "no decode was scheduled"


def test_preemption_takes_the_newest_and_recomputes_its_output():
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64)
    scheduler.add(make_request("old", 8, max_new=12))
    scheduler.add(make_request("new", 8, max_new=12))
    runner = FakeRunner(scheduler)
    preempted = []
    while scheduler.has_unfinished():
        out, _ = runner.step()
        preempted += out.preempted
    assert preempted and set(preempted) == {"new"}, preempted
    assert scheduler.blocks.num_free == 6


def test_abort_frees_blocks_wherever_the_request_is():
    scheduler = make_scheduler(num_blocks=8, budget=8)
    scheduler.add(make_request("a", 12))
    scheduler.add(make_request("b", 4))
    out = scheduler.schedule()
    scheduler.update(out, {})
    assert scheduler.finish("a", FinishReason.ABORTED).status is RequestStatus.FINISHED
    assert scheduler.finish("b", FinishReason.ABORTED) is not None
    assert scheduler.finish("b", FinishReason.ABORTED) is None
    assert scheduler.blocks.num_free == 8 and not scheduler.has_unfinished()
    scheduler.check_invariants()


def test_stop_conditions():
    scheduler = make_scheduler()
    scheduler.add(make_request("len", 2, max_new=2))
    scheduler.add(make_request("eos", 2, max_new=5))
    scheduler.add(make_request("min", 2, max_new=5, min_new=2))
    out = scheduler.schedule()
    assert scheduler.update(out, {"len": 5, "eos": 5, "min": EOS}) == []  # EOS before min_new is ignored
    out = scheduler.schedule()
    finished = scheduler.update(out, {"len": 5, "eos": EOS, "min": 5})
    assert {(r.request_id, r.finish_reason) for r in finished} == {
        ("len", FinishReason.LENGTH), ("eos", FinishReason.EOS)}
    out = scheduler.schedule()
    (done,) = scheduler.update(out, {"min": EOS})
    assert done.finish_reason is FinishReason.EOS and done.output_token_ids == [EOS, 5, EOS]


def test_context_length_caps_generation():
    scheduler = make_scheduler(max_len=12)
    scheduler.add(make_request("a", 10, max_new=100))
    finished = run_to_completion(scheduler, FakeRunner(scheduler))
    assert finished[0].finish_reason is FinishReason.LENGTH and finished[0].num_tokens == 12


def test_duplicate_request_id_is_refused():
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 2))
    with pytest.raises(ValueError, match="already"):
        scheduler.add(make_request("a", 2))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 8),
    eos_rate=st.sampled_from([0.0, 0.1]),
)
def test_random_workload_drains_with_every_block_free(seed, num_blocks, block_size, budget, max_seqs, eos_rate):
    """Thousands of schedule/update steps with arrivals, aborts and preemption; invariants after each."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks, block_size, budget, max_seqs, max_len=num_blocks * block_size)
    runner = FakeRunner(scheduler, eos_rate=eos_rate, seed=seed)
    capacity = num_blocks * block_size
    added, ended = [], []
    for step in range(120):
        if rng.random() < 0.3:
            prompt = rng.randint(1, max(1, capacity // 2))
            max_new = rng.randint(1, max(1, capacity - prompt))
            scheduler.add(make_request(f"r{step}", prompt, max_new))
            added.append(f"r{step}")
        if rng.random() < 0.05 and scheduler.requests:
            rid = rng.choice(sorted(scheduler.requests))
            ended.append(scheduler.finish(rid, FinishReason.ABORTED).request_id)
            runner.seen.pop(rid, None)
        ended += [r.request_id for r in runner.step()[1]]
    ended += [r.request_id for r in run_to_completion(scheduler, runner)]
    assert scheduler.blocks.num_free == num_blocks
    assert sorted(ended) == sorted(added), "a request ended twice or never"


# ---- paused requests (their client is not reading) give way ------------------------------------
def test_admission_is_round_robin_across_peers():
    """One peer's backlog does not keep another peer's request waiting behind it: a freed batch slot goes to the
    peer with the fewest running requests, each peer's requests in arrival order."""
    scheduler = make_scheduler(max_seqs=2, budget=64)
    for i in range(4):
        scheduler.add(make_request(f"flood{i}", 4, max_new=50))
        scheduler.requests[f"flood{i}"].peer = "ipv4:10.0.0.1"
    runner = FakeRunner(scheduler)
    out, _ = runner.step()
    assert [item.request_id for item in out.scheduled] == ["flood0", "flood1"]
    late = make_request("late", 4, max_new=3)
    late.peer = "ipv4:10.0.0.2"
    scheduler.add(late)  # behind flood2 and flood3 in the queue
    scheduler.finish("flood0", FinishReason.ABORTED)  # a slot frees: the other peer's request takes it
    out, _ = runner.step()
    assert [item.request_id for item in out.scheduled] == ["flood1", "late"]
    order = [r.request_id for r in scheduler._admission_order()]
    assert order == ["flood2", "flood3"]
    # without peers the queue's order is kept
    plain = make_scheduler(max_seqs=1)
    for rid in ("x", "y", "z"):
        plain.add(make_request(rid, 4))
    assert [r.request_id for r in plain._admission_order()] == ["x", "y", "z"]


def test_random_peers_drain_with_every_block_free():
    scheduler = make_scheduler(num_blocks=24, max_seqs=3, budget=16)
    rng = random.Random(3)
    for i in range(30):
        request = make_request(f"r{i}", rng.randrange(1, 20), max_new=rng.randrange(1, 12))
        request.peer = f"peer{rng.randrange(3)}"
        scheduler.add(request)
    finished = run_to_completion(scheduler, FakeRunner(scheduler, eos_rate=0.05))
    assert len(finished) == 30 and scheduler.blocks.num_free == 24


def test_paused_requests_give_their_batch_slots_to_waiting_requests():
    """max_num_seqs paused requests hold every slot; a new request is admitted by preempting the newest paused one,
    and the paused requests are never scheduled until resumed."""
    scheduler = make_scheduler(num_blocks=64, budget=64, max_seqs=2)
    runner = FakeRunner(scheduler)
    for rid in ("slow1", "slow2"):
        scheduler.add(make_request(rid, 4, max_new=50))
    runner.step()
    scheduler.paused |= {"slow1", "slow2"}
    assert not scheduler.has_runnable()
    scheduler.add(make_request("reader", 4, max_new=3))
    out, _ = runner.step()
    assert out.preempted == ["slow2"] and [s.request_id for s in out.scheduled] == ["reader"]
    finished = run_to_completion_of(scheduler, runner, "reader")
    assert finished.finish_reason is FinishReason.LENGTH
    assert scheduler.requests["slow2"].status is RequestStatus.WAITING and not scheduler.has_runnable()
    scheduler.paused.clear()  # both clients read again: both finish
    run_to_completion(scheduler, runner)
    assert scheduler.blocks.num_free == 64


def test_paused_requests_are_preempted_first_under_kv_pressure():
    scheduler = make_scheduler(num_blocks=7, block_size=4, budget=64, max_seqs=4)
    runner = FakeRunner(scheduler)
    scheduler.add(make_request("old", 8, max_new=12))  # 5 blocks at the end
    scheduler.add(make_request("paused", 4, max_new=12))
    runner.step()
    scheduler.paused.add("paused")
    scheduler.add(make_request("young", 4, max_new=8))  # the newest: without pauses, the first victim
    preempted = []
    while "old" in scheduler.requests or "young" in scheduler.requests:
        out, _ = runner.step()
        preempted += out.preempted
        assert "paused" not in {s.request_id for s in out.scheduled}
    assert preempted == ["paused"]
    scheduler.paused.clear()
    run_to_completion(scheduler, runner)


def test_a_paused_waiting_request_does_not_block_the_queue():
    scheduler = make_scheduler(num_blocks=64, budget=64, max_seqs=1)
    runner = FakeRunner(scheduler)
    scheduler.add(make_request("a", 4, max_new=40))
    runner.step()
    scheduler.paused.add("a")
    scheduler.add(make_request("b", 4, max_new=2))
    runner.step()  # "a" preempted for the slot, now waits at the head of the queue, paused
    assert scheduler.waiting[0].request_id == "a"
    run_to_completion_of(scheduler, runner, "b")
    assert not scheduler.has_runnable()  # only the paused request is left: the engine thread sleeps


def run_to_completion_of(scheduler, runner, rid, max_steps=1000):
    for _ in range(max_steps):
        out, finished = runner.step()
        for request in finished:
            if request.request_id == rid:
                return request
    raise AssertionError(f"{rid} did not finish")


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(8, 40), budget=st.integers(1, 64),
       max_seqs=st.integers(1, 6))
def test_random_pauses_never_block_a_reader(seed, num_blocks, budget, max_seqs):
    """Random arrivals, pauses and resumes: a paused request is never scheduled, and whenever some request is not
    paused, every step makes progress (schedules or preempts something)."""
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks, 4, budget, max_seqs, max_len=num_blocks * 4)
    runner = FakeRunner(scheduler, seed=seed)
    for step in range(150):
        if rng.random() < 0.3:
            prompt = rng.randint(1, num_blocks * 2)
            scheduler.add(make_request(f"r{step}", prompt, rng.randint(1, num_blocks * 4 - prompt)))
        if rng.random() < 0.2 and scheduler.requests:
            rid = rng.choice(sorted(scheduler.requests))
            (scheduler.paused.discard if rid in scheduler.paused else scheduler.paused.add)(rid)
        readers = set(scheduler.requests) - scheduler.paused
        out, _ = runner.step()
        assert not {s.request_id for s in out.scheduled} & scheduler.paused
        assert not readers or out.scheduled or out.preempted, "a reading request was left waiting"
    scheduler.paused.clear()
    run_to_completion(scheduler, runner)
    assert scheduler.blocks.num_free == num_blocks


# ---- prefix caching -------------------------------------------------------------------------------------
SYSTEM_PROMPTS = ([5] * 13, list(range(40, 61)), list(range(40, 48)) + [9] * 6)  # shared heads, partly shared


def make_caching_scheduler(num_blocks=24, block_size=4, budget=16, max_seqs=4, max_len=96):
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, num_blocks, block_size, enable_prefix_caching=True))


class KVRunner:
    """A fake model for prefix caching: the 'K/V' a token leaves in its slot is a digest of its whole prefix, as a real
    model's are. Each step checks that a scheduled request reads, at every position before its chunk, its own
    prefix's digest (cached blocks hold what it would have computed), and that it writes only into blocks nobody else
    holds."""

    def __init__(self, scheduler, seed=0):
        self.scheduler = scheduler
        self.kv: dict[int, int] = {}  # slot -> digest
        self.rng = random.Random(seed)

    def step(self):
        scheduler, bs = self.scheduler, self.scheduler.config.block_size
        out = scheduler.schedule()
        sampled = {}
        for item in out.scheduled:
            request = scheduler.requests[item.request_id]
            end = item.start + len(item.token_ids)
            assert item.token_ids == request.token_ids[item.start:end] and end <= request.num_tokens
            digests = list(itertools.accumulate(request.token_ids[:end], lambda d, t: hash((d, t)), initial=0))[1:]
            slots = [item.block_ids[p // bs] * bs + p % bs for p in range(end)]
            assert all(self.kv.get(slots[p]) == digests[p] for p in range(item.start)), "read someone else's K/V"
            for p in range(item.start, end):
                assert scheduler.blocks.refcount(item.block_ids[p // bs]) == 1, "wrote into a shared block"
                self.kv[slots[p]] = digests[p]
            if item.sample:
                sampled[item.request_id] = self.rng.randrange(1, 4)
        finished = scheduler.update(out, sampled)
        scheduler.check_invariants()
        return out, finished


class CachingSchedulerMachine(RuleBasedStateMachine):
    """Arrivals with shared system prompts, steps, aborts, pauses and resumes on a small pool (preemption), with the
    prefix cache on; at the end every request ended exactly once and every block is free."""

    def __init__(self):
        super().__init__()
        self.scheduler = make_caching_scheduler()
        self.runner = KVRunner(self.scheduler)
        self.added, self.ended = [], []

    @rule(head=st.integers(0, len(SYSTEM_PROMPTS) - 1), cut=st.integers(0, 21),
          turn=st.lists(st.integers(1, 3), max_size=6), max_new=st.integers(1, 12))
    def add(self, head, cut, turn, max_new):
        rid = f"r{len(self.added)}"
        prompt = (SYSTEM_PROMPTS[head][:cut] + turn) or [1]
        self.scheduler.add(Request(rid, prompt, SamplingParams(), StoppingParams(max_new), eos_token_ids=(EOS,)))
        self.added.append(rid)

    @rule(steps=st.integers(1, 4))
    def step(self, steps):
        for _ in range(steps):
            self.ended += [r.request_id for r in self.runner.step()[1]]

    @precondition(lambda self: self.scheduler.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        self.ended.append(self.scheduler.finish(rid, FinishReason.ABORTED).request_id)

    @precondition(lambda self: self.scheduler.requests)
    @rule(data=st.data())
    def toggle_pause(self, data):
        rid = data.draw(st.sampled_from(sorted(self.scheduler.requests)))
        paused = self.scheduler.paused
        (paused.discard if rid in paused else paused.add)(rid)

    @invariant()
    def consistent(self):
        self.scheduler.check_invariants()
        assert self.scheduler.prefix_hits <= self.scheduler.prefix_queries

    def teardown(self):
        self.scheduler.paused.clear()
        self.ended += [r.request_id for r in run_to_completion(self.scheduler, self.runner)]
        assert sorted(self.ended) == sorted(self.added), "a request ended twice or never"
        assert self.scheduler.blocks.num_free == 24
        self.scheduler.blocks.check_invariants()


TestCachingScheduler = CachingSchedulerMachine.TestCase
TestCachingScheduler.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_a_shared_prompt_is_computed_once():
    scheduler = make_caching_scheduler(budget=64)
    runner = KVRunner(scheduler)
    system = SYSTEM_PROMPTS[1]  # 21 tokens: 5 full blocks
    scheduler.add(Request("first", system + [1], SamplingParams(), StoppingParams(3), eos_token_ids=(EOS,)))
    run_to_completion(scheduler, runner)
    scheduler.add(Request("second", system + [2, 3], SamplingParams(), StoppingParams(3), eos_token_ids=(EOS,)))
    out, _ = runner.step()
    (item,) = out.scheduled
    assert (item.start, item.token_ids) == (20, system[20:] + [2, 3])  # 5 blocks shared, the rest computed
    assert scheduler.requests["second"].num_cached_tokens == 20
    assert (scheduler.prefix_queries, scheduler.prefix_hits) == (22 + 23, 20)
    run_to_completion(scheduler, runner)
    scheduler.add(Request("again", system, SamplingParams(), StoppingParams(2), eos_token_ids=(EOS,)))
    out, _ = runner.step()  # its whole prompt is cached: the last block runs again, for the logits
    assert (out.scheduled[0].start, len(out.scheduled[0].token_ids)) == (20, 1)
    run_to_completion(scheduler, runner)
    assert scheduler.blocks.num_free == 24


def test_a_preempted_request_resumes_from_its_own_cached_blocks():
    scheduler = make_caching_scheduler(num_blocks=6, budget=64)
    runner = KVRunner(scheduler)
    for rid in ("old", "new"):
        scheduler.add(make_request(rid, 8, max_new=12))
    starts = []
    while scheduler.has_unfinished():
        out, _ = runner.step()
        starts += [s.start for s in out.scheduled if s.request_id == "new" and len(s.token_ids) > 1]
    assert scheduler.num_preemptions and max(starts) > 0, starts  # recompute skipped what stayed cached
