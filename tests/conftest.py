"""Shared fixtures: the default model (installed by `make test`) and tiny random decoders built in-process.

Tiny models reuse the default model's tokenizer (vocabulary 49,152) so that server and detokenizer tests see real
text, while a forward pass costs about a millisecond. Their weights use a large init range so that greedy decoding
has clear top-2 margins: exact-token comparisons then test the engine, not floating-point ties.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Triton kernels run in the interpreter without a GPU (set before any kernel module is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.weights import default_model_dir  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# CI runs the same examples every time (HYPOTHESIS_PROFILE=ci in .ci/run); local runs explore new ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Per-test timeouts sized for a busy 2-core machine: pyproject's `timeout` for every test, this for the tests marked
# slow (the default model end to end, the packaging test), which took up to 393 s there. A test's own
# @pytest.mark.timeout wins.
SLOW_TIMEOUT_S = 1200


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="session")
def default_model() -> Path:
    path = default_model_dir()
    if not (path / "config.json").exists():
        pytest.fail(f"default model missing at {path}: `make test` installs it (python -m engine.weights install)")
    return path


def build_tiny_model(path: Path, arch: str = "llama", layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     hidden: int = 64, context: int = 512, seed: int = 0, **config) -> Path:
    from transformers import (Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM), "gemma2": (Gemma2Config, Gemma2ForCausalLM)}
    config_cls, model_cls = classes[arch]
    extra = ({"sliding_window": None} if arch == "mistral" else {}) | config
    config = config_cls(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
                        initializer_range=0.3, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir() / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_model) -> dict[str, Path]:
    """Three architectures and GQA ratios 2, 4 and 1 (Llama 4/2, Qwen2 with biases 4/1, Mistral 4/4)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": build_tiny_model(root / "llama", "llama", heads=4, kv_heads=2),
        "qwen2": build_tiny_model(root / "qwen2", "qwen2", heads=4, kv_heads=1, seed=1),
        "mistral": build_tiny_model(root / "mistral", "mistral", heads=4, kv_heads=4, seed=2),
    }


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]
