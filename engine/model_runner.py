"""ModelRunner: an HF causal LM running through certkv attention over the paged KV cache, one forward per step."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from engine.attention import ATTN_IMPLEMENTATION, register
from engine.batch import ForwardBatch, build_forward_batch
from engine.config import EngineConfig, ModelSpec
from engine.faults import NO_FAULTS, FaultPlan
from engine.kv.headq import BASIS_FILE, load_basis
from engine.kv.paged import PagedKVCache
from engine.kv.quantizers import Quantizer, make_quantizer
from engine.kv.tiers import TieredKVCache
from engine.request import Request
from engine.scheduler import SchedulerOutput
from engine.weights import resolve_model
from kernels import cpu

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("EngineConfig.device: cuda requested but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def check_supported(hf: PretrainedConfig) -> None:
    """Layer types certkv attention computes: full attention and sliding windows (the window arrives with each call)."""
    kinds = set(getattr(hf, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if kinds:
        raise ValueError(f"model: {hf.model_type} uses attention layers of types {sorted(kinds)}; certkv implements "
                         f"full and sliding-window attention")


class _AttentionProbe:
    """A KV cache for one dry forward pass: attention returns zeros, so the model's own attention keywords are checked
    (engine.attention.check_arguments) before any request runs."""

    def forward(self, layer, q, k, v, batch, scale, window=None):
        return torch.zeros_like(q)


def eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


class ModelRunner:
    def __init__(self, config: EngineConfig, faults: FaultPlan = NO_FAULTS):
        self.faults = faults
        register()
        hf_logging.disable_progress_bar()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        path = self.path = resolve_model(config.model)
        self.tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype, attn_implementation=ATTN_IMPLEMENTATION)
        self.model = model.to(self.device).eval()
        self.spec = self._build_spec(config, str(path))
        self.probe_attention()
        self.cache = self._build_cache(config)
        if config.tiered and self.device.type == "cpu" and cpu.available():
            seconds, compiled = cpu.warm_up()
            log.info("CPU kernels %s in %.1f s", "compiled (once per machine)" if compiled else "loaded", seconds)
        log.info("loaded %s (%s, %s on %s): %d KV blocks of %d tokens", path, self.spec.architecture, self.dtype,
                 self.device, self.spec.num_kv_blocks, config.block_size)

    def _build_spec(self, config: EngineConfig, model_id: str) -> ModelSpec:
        hf = self.model.config.get_text_config()
        check_supported(hf)
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        limit = hf.max_position_embeddings
        if config.max_model_len and config.max_model_len > limit:
            raise ValueError(f"EngineConfig.max_model_len: {config.max_model_len} exceeds the model's context {limit}")
        blocks = config.num_kv_blocks or self._blocks_for_budget(config, hf.num_hidden_layers, kv_heads, head_dim)
        if blocks < 1:
            raise ValueError("EngineConfig.kv_cache_memory: the budget holds less than one KV block")
        return ModelSpec(
            model_id=model_id, architecture=type(self.model).__name__, num_layers=hf.num_hidden_layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=hf.vocab_size,
            max_model_len=min(config.max_model_len or limit, blocks * config.block_size),
            eos_token_ids=eos_ids(self.model, self.tokenizer), dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device), block_size=config.block_size, num_kv_blocks=blocks,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )

    def _blocks_for_budget(self, config: EngineConfig, layers: int, kv_heads: int, head_dim: int) -> int:
        """Blocks that fit the device budget (--kv-cache-memory), the tiered cache's fixed pools included, and the
        host budget of the shadows (--shadow-memory)."""
        dense = PagedKVCache.bytes_per_block(layers, config.block_size, kv_heads, head_dim, self.dtype)
        if not config.tiered:
            return config.kv_cache_memory // dense
        tier1 = TieredKVCache.tier1_bytes(self._quantizer(config), head_dim, config.block_size)
        tier1 = layers * kv_heads * config.block_size * tier1
        fixed = TieredKVCache.fixed_bytes(layers, config.block_size, kv_heads, head_dim, self.dtype,
                                          config.max_num_seqs, *self._pools(config, layers, head_dim))
        if config.kv_cache_memory < fixed + tier1:
            raise ValueError(f"EngineConfig.kv_cache_memory: {config.kv_cache_memory} bytes do not hold the tiered "
                             f"cache's fixed pools ({fixed} bytes: scratch, prefetch pool and partial blocks of "
                             f"{config.max_num_seqs} sequences) and one block; raise it, or lower scratch_blocks, "
                             "prefetch_blocks or max_num_seqs")
        summaries = layers * kv_heads * TieredKVCache.summary_bytes(head_dim) if config.enable_prefix_caching else 0
        return int(min((config.kv_cache_memory - fixed) // tier1, config.shadow_memory // (dense + summaries)))

    def _pools(self, config: EngineConfig, layers: int, head_dim: int) -> tuple[int, int]:
        """(scratch pieces, prefetch pieces) per layer. Unset, each is 512, or as many pieces as fit an eighth of
        --kv-cache-memory when that is fewer (at least 16); with --num-kv-blocks (no budget) 512. The prefetch pool
        is 0 when prefetch is off."""
        piece = config.block_size * head_dim * self.dtype.itemsize  # keys or values of one (block, KV head)
        budgeted = config.kv_cache_memory // 8 // (2 * piece * layers) if config.num_kv_blocks is None else 512
        auto = max(16, min(512, budgeted))
        scratch = config.scratch_blocks or auto
        prefetch = (config.prefetch_blocks or auto) if self._prefetch(config) else 0
        return scratch, prefetch

    def _prefetch(self, config: EngineConfig) -> bool:
        return self.device.type == "cuda" if config.prefetch is None else config.prefetch

    def _build_cache(self, config: EngineConfig):
        spec = self.spec
        if not config.tiered:
            return PagedKVCache(spec.num_layers, spec.num_kv_blocks, config.block_size, spec.num_kv_heads,
                                spec.head_dim, self.dtype, self.device)
        if spec.head_dim % 16:
            raise ValueError(f"model: head_dim {spec.head_dim} is not a multiple of 16 (value groups)")
        scratch, prefetch = self._pools(config, spec.num_layers, spec.head_dim)
        return TieredKVCache(spec.num_layers, spec.num_kv_blocks, config.block_size, spec.num_kv_heads, spec.head_dim,
                             self.dtype, self.device, self._quantizer(config, self._headq_basis(config)),
                             config.max_num_seqs, scratch, self._prefetch(config), self.faults,
                             prefetch_blocks=max(prefetch, 1), share=config.enable_prefix_caching)

    @staticmethod
    def _quantizer(config: EngineConfig, basis: torch.Tensor | None = None) -> Quantizer:
        return make_quantizer(config.quantizer, config.k_bits, config.v_bits, rank=config.headq_rank,
                              side_bits=config.headq_bits, basis=basis)

    def _headq_basis(self, config: EngineConfig) -> torch.Tensor | None:
        """HeadQ's query basis on the device (None for other quantizers); a missing or mismatched file fails the
        start."""
        if "headq" not in config.quantizer.split("/"):
            return None
        path = Path(config.headq_basis) if config.headq_basis else self.path / BASIS_FILE
        spec = self.spec
        return load_basis(path, spec.num_layers, spec.num_kv_heads, spec.head_dim, config.headq_rank).to(self.device)

    @torch.inference_mode()
    def probe_attention(self) -> None:
        """One token through the model with a probe cache: a model whose attention passes a keyword certkv does not
        implement (engine.attention.UnsupportedAttention) is refused at load, with the keyword's name."""
        token = torch.zeros(1, 1, dtype=torch.int64, device=self.device)
        self.model(input_ids=token, position_ids=token, use_cache=False, forward_batch=object(),
                   kv_cache=_AttentionProbe())

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, requests: list[Request]) -> tuple[ForwardBatch, torch.Tensor]:
        """Runs the scheduled tokens; returns the batch and the float32 logits [S, vocab] of its sampled rows."""
        self.faults.before_step([r.client_id for r in requests])
        batch = build_forward_batch(output, self.spec.block_size, self.device, requests)
        self.cache.prepare(batch)
        result = self.model(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                            logits_to_keep=batch.logits_indices, use_cache=False, forward_batch=batch,
                            kv_cache=self.cache)
        self.cache.end_step(batch)
        return batch, result.logits[0].float()
