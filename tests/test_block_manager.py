"""Block manager: a hypothesis state machine drives allocate/grow/free and checks the invariants after each step."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import BlockManager


class BlockMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=24, block_size=4)
        self.tokens: dict[str, int] = {}

    @rule(rid=st.sampled_from("abcdefgh"), grow=st.integers(1, 30))
    def grow(self, rid, grow):
        want = self.tokens.get(rid, 0) + grow
        free_before = self.manager.num_free
        if self.manager.can_allocate(rid, want):
            new = self.manager.allocate(rid, want)
            self.tokens[rid] = want
            assert len(self.manager.table(rid)) == -(-want // 4)
            assert free_before - self.manager.num_free == len(new)
        else:
            with pytest.raises(MemoryError):
                self.manager.allocate(rid, want)
            assert self.manager.num_free == free_before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        held = len(self.manager.table(rid))
        assert len(self.manager.free(rid)) == held
        del self.tokens[rid]
        assert self.manager.free(rid) == []  # freeing twice is a no-op

    @invariant()
    def consistent(self):
        self.manager.check_invariants()
        held = sum(len(self.manager.table(r)) for r in self.tokens)
        assert held + self.manager.num_free == 24

    def teardown(self):
        for rid in list(self.tokens):
            self.manager.free(rid)
        assert self.manager.num_free == 24
        self.manager.check_invariants()


TestBlockMachine = BlockMachine.TestCase
TestBlockMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


def test_tables_are_disjoint_and_sized_by_tokens():
    manager = BlockManager(num_blocks=8, block_size=16)
    manager.allocate("a", 1)
    manager.allocate("b", 17)
    manager.allocate("a", 16)  # still one block
    assert len(manager.table("a")) == 1 and len(manager.table("b")) == 2
    assert not set(manager.table("a")) & set(manager.table("b"))
    assert manager.allocate("a", 33) and len(manager.table("a")) == 3
    assert manager.num_free == 3
