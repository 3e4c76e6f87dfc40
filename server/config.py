"""ServerConfig: the front end's settings, frozen, built once by server/cli.py next to EngineConfig."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.security import SecurityConfig


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (tests)
    max_pending_requests: int = 256  # admitted and not yet finished (queued + running); beyond: RESOURCE_EXHAUSTED
    max_tokens_in_flight: int = 0  # sum of prompt + max_new_tokens over pending requests; 0 = no limit
    max_prompt_chars: int = 1 << 20  # raw text or chat content, checked before tokenization
    max_message_bytes: int = 4 << 20  # gRPC receive limit
    drain_delay_s: float = 1.0  # NOT_SERVING is visible this long before the server stops accepting
    drain_grace_s: float = 30.0  # in-flight streams may finish within this; then they are cancelled
    max_connection_age_s: float | None = None  # clients reconnect (and rebalance) after this; streams get drain_grace_s
    warmup: bool = True  # one-token generation before SERVING
    security: SecurityConfig = field(default_factory=SecurityConfig)
    health_port: int | None = None  # a plaintext port serving only grpc.health.v1 (probes when TLS is on)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("ServerConfig.port: must be in [0, 65535]")
        for name in ("max_pending_requests", "max_prompt_chars", "max_message_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerConfig.{name}: must be positive")
        if self.drain_delay_s < 0 or self.drain_grace_s < 0:
            raise ValueError("ServerConfig.drain_delay_s / drain_grace_s: must be >= 0")
