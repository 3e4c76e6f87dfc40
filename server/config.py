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
    max_pending_per_peer: int = 64  # of the pending requests, one peer address's; 0 = no limit
    max_prompt_chars: int = 1 << 20  # raw text or chat content, checked before tokenization
    max_message_bytes: int = 4 << 20  # gRPC receive limit
    drain_delay_s: float = 1.0  # NOT_SERVING is visible this long before the server stops accepting
    drain_grace_s: float = 30.0  # in-flight streams may finish within this; then they are cancelled
    max_connection_age_s: float | None = None  # clients reconnect (and rebalance) after this; streams get drain_grace_s
    warmup: bool = True  # one-token generation before SERVING
    security: SecurityConfig = field(default_factory=SecurityConfig)
    health_port: int | None = None  # a plaintext port serving only grpc.health.v1 (probes when TLS is on)
    slow_client_timeout_s: float = 60.0  # a stream whose client reads nothing this long ends (RESOURCE_EXHAUSTED)
    tokenizer_threads: int = 2  # tokenization and chat templating run on these threads, never on the event loop
    tokenizer_queue: int = 32  # tokenizer jobs waiting or running; beyond: RESOURCE_EXHAUSTED
    tokenizer_queue_per_peer: int = 8  # of those, one peer address's; beyond: RESOURCE_EXHAUSTED
    max_chat_messages: int = 256  # messages of one chat input, checked before templating
    max_watch_per_peer: int = 8  # open health Watch streams per peer address; beyond: RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        for name in ("port", "health_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 65536:
                raise ValueError(f"ServerConfig.{name}: must be in [0, 65535]")
        for name in ("max_pending_requests", "max_prompt_chars", "max_message_bytes", "tokenizer_threads",
                     "tokenizer_queue", "tokenizer_queue_per_peer", "max_chat_messages", "max_watch_per_peer"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerConfig.{name}: must be positive")
        if self.max_pending_per_peer < 0 or self.max_tokens_in_flight < 0:
            raise ValueError("ServerConfig.max_pending_per_peer / max_tokens_in_flight: must be >= 0 (0: no limit)")
        if self.drain_delay_s < 0 or self.drain_grace_s < 0:
            raise ValueError("ServerConfig.drain_delay_s / drain_grace_s: must be >= 0")
        if not self.slow_client_timeout_s > 0:
            raise ValueError("ServerConfig.slow_client_timeout_s: must be > 0")
