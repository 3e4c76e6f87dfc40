"""The token-count lower bound is sound on hostile texts, and the tokenizer pool refuses work beyond its queue."""

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.errors import CapacityExceeded
from server.tokenizing import TokenCountBound, TokenizerPool


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="module")
def bound(tokenizer):
    return TokenCountBound(tokenizer)


PIECES = st.sampled_from([" ", "  ", "\n", "\t", " " * 80, "\n" + " " * 80, "#" * 40, "-" * 79, "=", "ManagementPlane",
                          "Protection", "internationalization", "東京", "🚀", "\u2581", "Ġ", "Ċ", "<|im_start|>",
                          "<|endoftext|>", "a", "1234567890", "é", "e\u0301", "\x00", "\ufffd"])


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.lists(PIECES, min_size=1, max_size=200).map("".join), st.text(min_size=1, max_size=400)))
def test_the_bound_never_exceeds_the_real_count(tokenizer, bound, text):
    assert bound.tokens_at_least(text) <= len(tokenizer(text)["input_ids"])


def test_the_bound_refuses_a_megabyte_without_tokenizing(bound):
    """Any 1 MiB text needs more than the default model's 8,192-token context; ordinary text is bounded far tighter
    than by the longest vocabulary entry (81 bytes of spaces)."""
    assert bound.sound and bound.cheap
    for text in (" " * (1 << 20), "#" * (1 << 20), "x" * (1 << 20), "Tell me about the sea. " * 46_000):
        assert bound.tokens_at_least(text) > 8192
    assert bound.tokens_at_least("Tell me about the sea. " * 46_000) > 3 * 8192


async def test_the_pool_refuses_jobs_beyond_its_queue(tokenizer):
    pool = TokenizerPool(tokenizer, threads=1, queue_limit=2)
    release = threading.Event()
    try:
        held = [asyncio.ensure_future(pool.run(lambda tok: release.wait())) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(CapacityExceeded, match="tokenizer queue is full"):
            await pool.run(lambda tok: None)
        release.set()
        await asyncio.gather(*held)
        assert not pool.jobs
        assert await pool.run(lambda tok, text: tok(text)["input_ids"], "hi") == tokenizer("hi")["input_ids"]
    finally:
        release.set()
        pool.close()


async def test_a_clients_backlog_never_stands_in_front_of_another_client(tokenizer):
    """One thread, client A's first job running and three more waiting: client B's job, queued last, runs next."""
    pool = TokenizerPool(tokenizer, threads=1, queue_limit=16, per_client=8)
    started, release, order = threading.Event(), threading.Event(), []

    def job(tok, name, block=False):
        started.set()
        if block:
            release.wait()
        order.append(name)

    try:
        first = asyncio.ensure_future(pool.run(job, "A1", True, client="A"))
        await asyncio.to_thread(started.wait)
        rest = [asyncio.ensure_future(pool.run(job, name, client=client))
                for name, client in (("A2", "A"), ("A3", "A"), ("A4", "A"), ("B1", "B"))]
        await asyncio.sleep(0)  # every job queued before the first one ends
        release.set()
        await asyncio.gather(first, *rest)
    finally:
        release.set()
        pool.close()
    assert order == ["A1", "B1", "A2", "A3", "A4"]


async def test_one_client_cannot_take_the_whole_queue(tokenizer):
    pool = TokenizerPool(tokenizer, threads=1, queue_limit=8, per_client=2)
    release = threading.Event()
    try:
        held = [asyncio.ensure_future(pool.run(lambda tok: release.wait(), client="A")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(CapacityExceeded, match="--tokenizer-queue-per-peer"):
            await pool.run(lambda tok: None, client="A")
        other = asyncio.ensure_future(pool.run(lambda tok: "served", client="B"))
        release.set()
        assert await other == "served"
        await asyncio.gather(*held)
    finally:
        release.set()
        pool.close()


async def test_each_thread_has_its_own_tokenizer(tokenizer):
    pool = TokenizerPool(tokenizer, threads=2, queue_limit=8)
    seen, barrier = [], threading.Barrier(2, timeout=30)

    def job(tok):
        barrier.wait()  # both threads at once
        seen.append(id(tok))

    try:
        await asyncio.gather(pool.run(job), pool.run(job))
    finally:
        pool.close()
    assert len(set(seen)) == 2 and id(tokenizer) not in seen
