"""Fault injection for tests: named points the engine and the tiered cache consult at the places that can fail.

A FaultPlan is an object handed to the engine (never a global; the server has no flag that builds one). It enables
itself only in tests: the constructor refuses unless `testing=True` is passed by test code or the environment sets
CERTKV_ENABLE_FAULTS=1, so a production process cannot be talked into corrupting its cache.

Points (name -> parameters):
  step.raise        {"after": n}            the n-th forward pass (0-based) and every later one raise, once each
                                            unless "times" is given
  step.delay_ms     {"ms": d}               every forward pass sleeps d ms first
  forward.raise     {"request": id}         every forward pass that runs that request raises (a request that
                                            crashes the model, whoever shares its batch)
  shadow.corrupt    {"request": id}         that request's tier-2 shadows are overwritten once its first block fills
  shadow.drop       {"request": id}         reading that request's shadows fails (the shadow is gone)
  copy.fail         {}                      every tier-2 fetch fails
  kv.nonfinite      {"request": id}         that request's first quantized block gets an infinite key scale
  sample.nonfinite  {"request": id}         that request's logits are NaN when it is sampled (a model failing on
                                            one row of the batch)
  output.raise      {"request": id}         post-processing that request's token (detokenizer, stop strings) raises

A point's "request" is the caller's request id (client_id).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

POINTS = ("step.raise", "step.delay_ms", "forward.raise", "shadow.corrupt", "shadow.drop", "copy.fail", "kv.nonfinite",
          "sample.nonfinite", "output.raise")


class ShadowError(RuntimeError):
    """Tier-2 data for these requests is missing or corrupt: their exact paths are impossible."""

    def __init__(self, request_ids: list[str], reason: str):
        super().__init__(f"{reason} for {len(request_ids)} request(s)")
        self.request_ids = request_ids
        self.reason = reason


@dataclass
class FaultPlan:
    points: dict[str, dict] = field(default_factory=dict)
    testing: bool = False
    steps: int = 0
    fired: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.points) - set(POINTS)
        if unknown:
            raise ValueError(f"FaultPlan: unknown points {sorted(unknown)} (known: {POINTS})")
        if self.points and not (self.testing or os.environ.get("CERTKV_ENABLE_FAULTS") == "1"):
            raise PermissionError("fault injection is for tests: set CERTKV_ENABLE_FAULTS=1 to enable it")

    def active(self, point: str) -> dict | None:
        return self.points.get(point)

    def hit(self, point: str) -> None:
        self.fired[point] = self.fired.get(point, 0) + 1

    def before_step(self, client_ids: list[str] = ()) -> None:
        """Called at the start of every forward pass, with the caller's ids of the requests it runs."""
        if any(self.targets("forward.raise", client_id) for client_id in client_ids):
            self.hit("forward.raise")
            raise RuntimeError("injected failure of a forward pass running a poisoned request")
        if (delay := self.active("step.delay_ms")) is not None:
            time.sleep(delay["ms"] / 1000)
        if (crash := self.active("step.raise")) is not None:
            index = self.steps
            self.steps += 1
            times = crash.get("times")
            if index >= crash.get("after", 0) and (times is None or self.fired.get("step.raise", 0) < times):
                self.hit("step.raise")
                raise RuntimeError(f"injected failure in forward pass {index}")

    def targets(self, point: str, request_id: str) -> bool:
        params = self.active(point)
        return params is not None and params.get("request") == request_id


NO_FAULTS = FaultPlan()
