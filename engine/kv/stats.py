"""Certificate accounting: per-request aggregates (the Certificate message) and one record per escalation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.request import KVMode

RUNGS = 5  # 0 certified, 1 values, 2 keys, 3 exact head, 4 exact layer
RATIO_DECADES, RATIO_PER_DECADE = 4, 16  # audit histogram of actual/bound: 1e-4 .. 1, 16 bins a decade
RATIO_BINS = RATIO_DECADES * RATIO_PER_DECADE + 2  # plus "below 1e-4" (bin 0) and "above 1" (the last bin)


def ratio_bins(ratios: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each actual/bound ratio (log scale; 0 below 1e-4, RATIO_BINS - 1 above 1)."""
    position = torch.floor((torch.log10(ratios.clamp_min(1e-30)) + RATIO_DECADES) * RATIO_PER_DECADE)
    return (position.clamp(-1, RATIO_BINS - 2) + 1).long()


@dataclass(frozen=True, slots=True)
class EscalationRecord:
    """One KV group of one sequence that left rung 0 at one layer and step (docs/certificate.md, "The ladder")."""

    request_id: str  # the caller's id
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
    engine_id: str = ""  # the engine's (unique) id of the request


@dataclass(slots=True)
class CertificateStats:
    """Aggregates over a request's lifetime; a query head at one layer and step is one evaluation."""

    mode: KVMode
    tolerance: float
    evaluations: int = 0
    rungs: list[int] = field(default_factory=lambda: [0] * RUNGS)  # evaluations by the rung that produced them
    max_bound: float = 0.0  # largest accepted (non-exact) bound
    max_bound_over_tolerance: float = 0.0  # largest accepted bound / (tolerance * scale)
    audit_violations: int = 0  # audit: accepted outputs farther from the reference than their bound
    promise_violations: int = 0  # audit: accepted outputs farther than tolerance * max(||O_ref||, RMS_ref)
    worst_actual_over_bound: float = 0.0
    worst_actual_over_promise: float = 0.0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    quantized_key_mass: float = 0.0  # sum over evaluations of the attention mass on quantized keys (alpha^_T)
    ratio_hist: list[int] = field(default_factory=lambda: [0] * RATIO_BINS)  # audit: actual/bound, log scale

    @staticmethod
    def histogram_median(hist: list[int]) -> float | None:
        """The median actual/bound from a ratio histogram, at the bin's geometric centre (about 7% resolution)."""
        total = sum(hist)
        if not total:
            return None
        running = 0
        for b, count in enumerate(hist):
            running += count
            if 2 * running >= total:
                return 10 ** ((b - 0.5) / RATIO_PER_DECADE - RATIO_DECADES)
        return None

    @property
    def certified_rung0(self) -> int:
        return self.rungs[0]

    def add_record(self, record: EscalationRecord) -> None:
        self.transfer_bytes += record.bytes
        self.transfer_seconds += record.transfer_seconds

    def add_exact(self, evaluations: int) -> None:
        """Evaluations computed exactly from tier 2 (exact mode: rung 3)."""
        self.evaluations += evaluations
        self.rungs[3] += evaluations

    def add_audit(self, violations: int, promise_violations: int, worst_over_bound: float, worst_over_promise: float,
                  counts: list[int]) -> None:
        """One layer's audit of this request's accepted heads (counts: the ratio histogram's)."""
        self.audit_violations += violations
        self.promise_violations += promise_violations
        self.worst_actual_over_bound = max(self.worst_actual_over_bound, worst_over_bound)
        self.worst_actual_over_promise = max(self.worst_actual_over_promise, worst_over_promise)
        self.ratio_hist = [a + b for a, b in zip(self.ratio_hist, counts)]
