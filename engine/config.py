"""Engine configuration: `EngineConfig` is built once from the command line (server/cli.py) and never edited;
`ModelSpec` holds what is only known once the model is loaded (shapes, limits, number of KV blocks)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from engine.kv.quantizers import make_quantizer

DEVICES = ("auto", "cpu", "cuda")
KV_MODES = ("dense", "quantized", "certified", "exact", "audit")
DEFAULT_TOLERANCE = 0.2  # relative to max(||O_ref||, RMS of the attended values); README "Choosing the tolerance"
DTYPES = ("auto", "float32", "bfloat16", "float16")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_bytes(text: str) -> int:
    """'512MiB', '1GiB', '2G', '1048576' -> bytes (KiB/MiB/GiB are powers of 1024, K/M/G of 1000)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1000000)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    scale = 1024 ** ("kmgt".index(unit[0]) + 1) if "i" in unit else _UNITS[unit[:1]]
    return int(number * scale)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "default"  # "default", an HF model directory or a .gguf file
    device: str = "auto"  # auto = cuda when available
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int = 1 << 30  # bytes of KV blocks to allocate
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests, benchmarks)
    max_num_seqs: int = 64  # requests in one batch
    max_num_batched_tokens: int = 512  # tokens in one forward pass (decodes first, then prefill chunks)
    max_model_len: int | None = None  # prompt + output cap; default and upper bound: the model's context
    max_new_tokens_default: int = 256  # when a request leaves max_new_tokens unset
    threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    kv_mode: str = "certified"  # dense: plain paged cache; others: the tiered cache, mode = requests' default
    tolerance: float = DEFAULT_TOLERANCE  # certified/audit requests' default
    k_bits: int = 8
    v_bits: int = 4
    quantizer: str = "minmax"
    headq_rank: int = 32  # HeadQ (engine/kv/headq.py): query-basis directions with a side code
    headq_bits: int = 4  # bits of each side-code coordinate
    headq_basis: str | None = None  # its basis file; None: headq.safetensors in the model's directory
    scratch_blocks: int | None = None  # per layer: exact (block, KV head) pieces kept on the device, keys and values
    # each; None: 512, or what an eighth of kv_cache_memory holds when that is fewer (ModelRunner._pools)
    shadow_memory: int = 2 << 30  # bytes of tier-2 shadows (host); with kv_cache_memory it caps the number of blocks
    prefetch: bool | None = None  # tier-2 fetches likely at the next step start early (copy stream / worker
    # thread); None: on with CUDA, off on a CPU (where a fetch is a memcpy and nothing overlaps it)
    prefetch_blocks: int | None = None  # per layer: prefetched pieces held on the device until used (oldest dropped
    # past it); None: as the scratch's default
    enable_prefix_caching: bool = True  # full blocks of a prompt found cached are shared, not recomputed

    def __post_init__(self) -> None:
        _require(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
        _require(self.block_size in (8, 16, 32), "block_size", "must be 8, 16 or 32")
        _require(self.kv_cache_memory > 0, "kv_cache_memory", "must be positive")
        _require(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be positive")
        _require(self.max_num_seqs > 0, "max_num_seqs", "must be positive")
        _require(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be positive")
        _require(self.max_model_len is None or self.max_model_len > 1, "max_model_len", "must be > 1")
        _require(self.max_new_tokens_default > 0, "max_new_tokens_default", "must be positive")
        _require(self.threads is None or self.threads > 0, "threads", "must be positive")
        _require(self.kv_mode in KV_MODES, "kv_mode", f"must be one of {KV_MODES}")
        _require(self.tolerance >= 0 and self.tolerance == self.tolerance, "tolerance", "must be >= 0")
        try:
            make_quantizer(self.quantizer, self.k_bits, self.v_bits, rank=self.headq_rank, side_bits=self.headq_bits)
        except ValueError as e:
            raise ValueError(f"EngineConfig.quantizer/k_bits/v_bits/headq_rank/headq_bits: {e}") from None
        _require(self.scratch_blocks is None or self.scratch_blocks > 0, "scratch_blocks", "must be positive")
        _require(self.prefetch_blocks is None or self.prefetch_blocks > 0, "prefetch_blocks", "must be positive")
        _require(self.shadow_memory > 0, "shadow_memory", "must be positive")

    @property
    def tiered(self) -> bool:
        return self.kv_mode != "dense"

    def replace(self, **changes) -> EngineConfig:
        return dataclasses.replace(self, **changes)

    def cache_salt(self, spec: ModelSpec) -> str:
        """Everything besides the tokens that decides what a KV block holds: blocks are shared only under the same
        salt (engine.block_manager). The tiered cache's blocks carry codes and annotations of one quantizer."""
        kind = "dense"
        if self.tiered:
            kind = f"tiered {self.quantizer} k{self.k_bits} v{self.v_bits}"
            if "headq" in self.quantizer.split("/"):
                kind += f" rank{self.headq_rank} side{self.headq_bits} basis={self.headq_basis}"
        return "|".join((spec.model_id, spec.architecture, spec.dtype, kind, f"block{self.block_size}"))


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the loaded model and the allocated cache fix; built once by the model runner."""

    model_id: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    block_size: int
    num_kv_blocks: int
    has_chat_template: bool

    @property
    def capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"EngineConfig.{field}: {message}")
