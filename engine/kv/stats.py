"""Certificate accounting: per-request aggregates (the Certificate message) and one record per escalation."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import KVMode

RUNGS = 5  # 0 certified, 1 values, 2 keys, 3 exact head, 4 exact layer


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    """One KV group of one sequence that left rung 0 at one layer and step (DESIGN.md section 4)."""

    request_id: str
    layer: int
    kv_head: int
    rung: int
    bound_before: float  # largest bound of the group's query heads at rung 0
    bound_after: float  # after the escalation (0 for the exact rungs)
    tolerance: float
    blocks: int  # blocks moved from tier 2
    bytes: int
    transfer_seconds: float
    prefetch_hit: bool = False


@dataclass(slots=True)
class CertificateStats:
    """Aggregates over a request's lifetime; a query head at one layer and step is one evaluation."""

    mode: KVMode
    tolerance: float
    evaluations: int = 0
    rungs: list[int] = field(default_factory=lambda: [0] * RUNGS)  # evaluations by the rung that produced them
    max_bound: float = 0.0  # largest accepted (non-exact) bound
    max_bound_over_tolerance: float = 0.0  # largest accepted bound / (tolerance * scale)
    audit_violations: int = 0
    worst_actual_over_bound: float = 0.0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0

    @property
    def certified_rung0(self) -> int:
        return self.rungs[0]

    def add_record(self, record: EscalationRecord) -> None:
        self.transfer_bytes += record.bytes
        self.transfer_seconds += record.transfer_seconds
