"""What a generation holds besides the weights: the KV cache and the activations, from the model's config.

A budget covers everything a run holds (`weightlift.plan`'s ``reserve``): the planner gives the weights
what is left after these two terms.

- **KV cache**: per attention layer, a key and a value of ``kv_heads x head_dim`` per token, for the prompt
  and every new token, in the model's dtype. Exact for transformers' full-attention cache.
- **Activations**: the prefill's intermediates, which grow with the prompt, plus the logits of one token and
  half the KV cache again (a growing cache is concatenated into new memory, and the allocator keeps what
  it freed). Fitted to peaks measured with torch 2.13 on the CPU (glibc's allocator; Llama-shaped models,
  hidden 256-1024, intermediate 768-3072, 8-16 layers, prompts of 512-4096 tokens): the measured peak
  above the loaded weights was 0.44-0.99 of these two terms, depending on the shape and on the allocator's
  state (``tests/test_footprint.py``): an upper estimate, not a guess that may fall short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .dtypes import dtype_size

ACT_PER_INTERMEDIATE = 8  # prefill values per token per intermediate unit (gate, up, their product, copies)
ACT_PER_HIDDEN = 14  # prefill values per token per hidden unit (residual, norms, q/k/v/o, attention output)
LOGIT_COPIES = 4  # the last token's logits: float32, processed and copied by generate's sampling


@dataclass(frozen=True)
class RunFootprint:
    """Bytes a generation of ``prompt_tokens + new_tokens`` holds besides the weights."""

    kv_cache_bytes: int
    activation_bytes: int
    tokens: int  # the context the KV cache term is for (prompt + new)

    @property
    def nbytes(self) -> int:
        return self.kv_cache_bytes + self.activation_bytes

    @classmethod
    def of(cls, config: Any, prompt_tokens: int, new_tokens: int, dtype: torch.dtype | None = None) -> RunFootprint:
        """From a transformers config (or anything with its attribute names); ``dtype``: the model's (default:
        the config's ``torch_dtype``/``dtype``, else float32)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(getattr(text, "hidden_size", 0) or 0)
        heads = int(getattr(text, "num_attention_heads", 0) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or (hidden // heads if hidden else 0))
        layers = int(getattr(text, "num_hidden_layers", 0) or 0)
        intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
        vocab = int(getattr(text, "vocab_size", 0) or 0)
        dtype = dtype or _dtype_of(text)
        item = dtype_size(dtype)
        tokens = prompt_tokens + new_tokens
        kv = 2 * layers * kv_heads * head_dim * tokens * item
        prefill = prompt_tokens * (ACT_PER_INTERMEDIATE * intermediate + ACT_PER_HIDDEN * hidden) * item
        activations = prefill + LOGIT_COPIES * vocab * 4 + kv // 2
        return cls(kv_cache_bytes=kv, activation_bytes=activations, tokens=tokens)


def _dtype_of(config: Any) -> torch.dtype:
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) else torch.float32
