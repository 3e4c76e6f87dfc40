"""SchedulerOutput -> ForwardBatch: the one place where the scheduler's lists become tensors.

A batch is flattened: the new tokens of all B sequences are concatenated into one row of T tokens (no padding),
and attention is told where each sequence starts. Sequences with a single new token (decodes) are also listed
separately so that attention can batch them; the others (prefill chunks) are attended one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.request import KVPolicy, Request
from engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class ForwardBatch:
    request_ids: list[str]  # B: the sequences, in the order of their tokens
    input_ids: torch.Tensor  # [T] int64: the new tokens, sequence after sequence
    positions: torch.Tensor  # [T] int64: each new token's position in its sequence
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) receiving each token's K/V
    slot_mapping_host: torch.Tensor  # [T] int64: the same on the host (tier-2 writes read it without a device sync)
    block_tables: torch.Tensor  # [B, max_blocks] int64: each sequence's blocks, padded with 0 (never read)
    context_lens: torch.Tensor  # [B] int64: tokens in the cache after this step (start + query length)
    query_starts: list[int]  # B + 1: offset of each sequence's first new token in T; the last entry is T
    starts: list[int]  # B: tokens already in the cache before this step
    decode_seqs: torch.Tensor  # [Bd] int64: indices (into B) of sequences with exactly one new token
    decode_rows: torch.Tensor  # [Bd] int64: that token's row in T
    decode_lens: list[int]  # Bd: their context_lens on the host (attention sizes its gathers without a device sync)
    prefill_seqs: list[int]  # indices (into B) of sequences with more than one new token
    logits_indices: torch.Tensor  # [S] int64: rows of T whose logits are sampled, one per sampling sequence
    sample_ids: list[str]  # S: the request of each sampled row
    block_ids: list[list[int]]  # B: each sequence's block table as a list (what the tiered cache plans with)
    kv: list[KVPolicy]  # B: each sequence's KV mode and tolerance
    client_ids: list[str]  # B: the callers' ids (for records and fault targets; not unique)
    block_size: int
    cache_meta: Any = field(default=None)  # filled once per step by the KV cache's prepare(); read only by it

    @property
    def num_tokens(self) -> int:
        return self.query_starts[-1]

    def query_len(self, seq: int) -> int:
        return self.query_starts[seq + 1] - self.query_starts[seq]


def build_forward_batch(output: SchedulerOutput, block_size: int, device: torch.device,
                        requests: list[Request]) -> ForwardBatch:
    """`requests` are the scheduled requests, in the order of output.scheduled."""
    input_ids, positions, slots, starts, query_starts = [], [], [], [], [0]
    decode_seqs, decode_rows, decode_lens, prefill_seqs, logits_rows, sample_ids = [], [], [], [], [], []
    for seq, item in enumerate(output.scheduled):
        n = len(item.token_ids)
        input_ids += item.token_ids
        span = range(item.start, item.start + n)
        positions += span
        slots += [item.block_ids[p // block_size] * block_size + p % block_size for p in span]
        starts.append(item.start)
        query_starts.append(query_starts[-1] + n)
        if n == 1:
            decode_seqs.append(seq)
            decode_rows.append(query_starts[-2])
            decode_lens.append(item.start + 1)
        else:
            prefill_seqs.append(seq)
        if item.sample:
            logits_rows.append(query_starts[-1] - 1)
            sample_ids.append(item.request_id)
    width = max(len(item.block_ids) for item in output.scheduled)
    tables = [item.block_ids + [0] * (width - len(item.block_ids)) for item in output.scheduled]

    def tensor(values):
        return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

    slot_mapping_host = torch.tensor(slots, dtype=torch.int64)

    return ForwardBatch(
        request_ids=[item.request_id for item in output.scheduled],
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=slot_mapping_host.to(device, non_blocking=True),
        slot_mapping_host=slot_mapping_host,
        block_tables=tensor(tables),
        context_lens=tensor([s + len(item.token_ids) for s, item in zip(starts, output.scheduled)]),
        query_starts=query_starts,
        starts=starts,
        decode_seqs=tensor(decode_seqs),
        decode_rows=tensor(decode_rows),
        decode_lens=decode_lens,
        prefill_seqs=prefill_seqs,
        logits_indices=tensor(logits_rows),
        sample_ids=sample_ids,
        block_ids=[item.block_ids for item in output.scheduled],
        kv=[request.kv for request in requests],
        client_ids=[request.client_id for request in requests],
        block_size=block_size,
    )
