"""Tiny models built from configs with fixed seeds (no hub access), and helpers to compare them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from skips import pytest_runtest_makereport  # noqa: F401 (a hook: skips fail where the extras are installed)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _llama_like(config_cls, model_cls, **extra):
    def build(layers: int = 5):
        cfg = config_cls(**COMMON, intermediate_size=128, num_hidden_layers=layers, num_key_value_heads=2, **extra)
        return model_cls(cfg)

    return build


def _builders():
    import transformers as tf

    return {
        "llama": (_llama_like(tf.LlamaConfig, tf.LlamaForCausalLM), "mlp"),
        "qwen2": (_llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM), "mlp"),
        "qwen3": (_llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16), "mlp"),
        "mistral": (_llama_like(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=None), "mlp"),
        "gemma": (_llama_like(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=16), "mlp"),
        "mixtral": (
            _llama_like(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
            "experts",
        ),
        "qwen3_moe": (
            _llama_like(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, decoder_sparse_step=1, head_dim=16),
            "experts",
        ),
        "gpt2": (
            lambda layers=5: tf.GPT2LMHeadModel(
                tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128,
                              bos_token_id=1, eos_token_id=2)
            ),
            "mlp",
        ),
        "opt": (
            lambda layers=5: tf.OPTForCausalLM(
                tf.OPTConfig(**COMMON, ffn_dim=128, num_hidden_layers=layers, word_embed_proj_dim=64,
                             max_position_embeddings=128)
            ),
            "fc1",
        ),
    }  # fmt: skip


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "mixtral", "gpt2", "opt"]


def tiny(family: str, layers: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _builders()[family][0](layers).eval()


def mlp_segment(family: str) -> str:
    return _builders()[family][1]


def prompt(seed: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


class Outputs(tuple):
    """``(logits, tokens)`` from `run`; ``steps`` holds the logits of every generated token (one decode step
    each, with the KV cache), stacked."""

    steps: torch.Tensor


def run(model: nn.Module, ids: torch.Tensor, new_tokens: int = 8, mode=torch.inference_mode) -> Outputs:
    """Logits of a full forward and a greedy generation with KV cache (under ``mode``)."""
    with mode():
        logits = model(ids).logits
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
    out = Outputs((logits, gen.sequences))
    out.steps = torch.stack(gen.logits)
    return out


def assert_outputs_equal(out: Outputs, ref: Outputs) -> None:
    """Bitwise: the forward's logits, the generated tokens and every decode step's logits."""
    assert torch.equal(out[0], ref[0]), "forward logits differ"
    assert torch.equal(out[1], ref[1]), "generated tokens differ"
    assert torch.equal(out.steps, ref.steps), "decode-step logits differ"


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2 as transformers loads its GGUF (dequantized in RAM), and a chat prompt's ids.
    Session-wide: test_smollm2 and test_convert share the one slow load."""
    from weightlift.hf import chat_ids, load_gguf, smollm2_file

    model, tokenizer = load_gguf(smollm2_file())
    return model, chat_ids(tokenizer, "What is the capital of France?")


def leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """Independent of weightlift: the plain tensors holding ``t``'s bytes, itself or for a wrapper subclass
    (torchao, quanto, bitsandbytes' tensors) the inner tensors it flattens to, recursively."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()  # inner objects that are not tensors (a DTensor's DeviceMesh) hold none
        return [leaf for a in attrs if isinstance(inner := getattr(t, a), torch.Tensor) for leaf in leaves(inner)]
    return [t]


def slot_bytes_by_hand(layer: nn.Module, segment: str | None = None) -> int:
    """A slot for ``layer`` derived by hand: each parameter's and buffer's plain tensors (`leaves`), each in a
    storage of its own at a 512-byte boundary (only names with the dotted ``segment``, as ``params=`` picks)."""
    total = 0
    for name, t in (*layer.named_parameters(), *layer.named_buffers()):
        if segment is None or f".{segment}." in f".{name}.":
            total += sum((leaf.untyped_storage().nbytes() + 511) // 512 * 512 for leaf in leaves(t.detach()))
    return total


def _storage_ptr(t: torch.Tensor):
    """Where ``t``'s bytes live: the storage address of each of its leaves; None for a wrapper without any."""
    try:
        return tuple(leaf.untyped_storage().data_ptr() for leaf in leaves(t.detach()))
    except (RuntimeError, NotImplementedError):  # a wrapper subclass that does not flatten
        return None


def snapshot(model: nn.Module) -> dict:
    """Every parameter and buffer: a copy of its bytes (of each leaf), its device, dtype, type and storage."""
    out = {}
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        value = [leaf.detach().clone() for leaf in leaves(t.detach())]
        out[name] = (value, t.device, t.dtype, type(t), _storage_ptr(t))
    return out


HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
              "_backward_hooks", "_state_dict_pre_hooks", "_load_state_dict_post_hooks")  # fmt: skip


def hook_counts(model: nn.Module) -> list[int]:
    return [sum(len(getattr(m, d, {})) for m in model.modules()) for d in HOOK_DICTS]


def assert_same(model: nn.Module, snap: dict, *, same_storage: bool = False) -> None:
    """Bitwise equal to ``snap``, same device, dtype and type (and same storage when asked)."""
    now = dict((*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)))
    assert now.keys() == snap.keys()
    for name, (value, device, dtype, kind, ptr) in snap.items():
        t = now[name]
        assert (t.device, t.dtype, type(t)) == (device, dtype, kind), name
        now_leaves = leaves(t.detach())
        assert len(now_leaves) == len(value), name
        for leaf, old in zip(now_leaves, value):
            if old.is_meta:  # no bytes to compare
                assert leaf.shape == old.shape, name
            else:
                assert torch.equal(leaf, old), name
        if same_storage:
            assert _storage_ptr(t) == ptr, name


# A Llama of 16 layers x 13 MiB (208 MiB offloaded) with tiny embeddings, for peak-RSS tests.
BIG_LLAMA = dict(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
                 num_attention_heads=8, num_key_value_heads=8)  # fmt: skip

RSS_PRELUDE = """
import sys, torch, weightlift, weightlift.hf, transformers as tf
from accelerate import init_empty_weights

def status(key):  # bytes, from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def reset_peak():
    # import the Llama modeling code (transformers imports lazily, optional quantization libraries with it)
    # and run a tiny forward first, so the growth measured after this is weights and activations
    small = tf.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)
    with init_empty_weights(include_buffers=False):
        tf.AutoModelForCausalLM.from_config(small)
    with torch.inference_mode():
        tf.LlamaForCausalLM(small)(torch.zeros(1, 4, dtype=torch.long))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM, what ru_maxrss reports) so import-time peaks do not hide growth
    return status("VmRSS")
"""


def measure_in_subprocess(body: str, *args: object) -> list[int]:
    """Run ``RSS_PRELUDE + body`` in a fresh interpreter; the integers its last line prints."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_PRELUDE + body, *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return [int(x) for x in out.stdout.strip().splitlines()[-1].split()]


def folder_files(folder) -> dict:
    """Every file under ``folder``: its bytes and mtime (empty for a folder that is not there)."""
    if folder is None or not os.path.isdir(folder):
        return {}
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@contextlib.contextmanager
def refused(model: nn.Module, match: str, folder=None):
    """The block raises an OffloadError matching ``match`` and leaves ``model`` as it was: every tensor's bytes,
    device, dtype, type and storage, and its hooks; and every file under ``folder`` (bytes and mtime), if given."""
    import weightlift

    snap, hooks, files = snapshot(model), hook_counts(model), folder_files(folder)
    with pytest.raises(weightlift.OffloadError, match=match):
        yield
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks
    assert folder_files(folder) == files  # nothing written over, nothing left behind


def assert_refused(model: nn.Module, folder, config, match: str) -> None:
    """`offload` raises an OffloadError matching ``match``, leaves the model and every file in ``folder`` as
    they were."""
    import weightlift

    with refused(model, match, folder):
        weightlift.offload(model, device="cpu", config=config)


def change_file(path, how: str) -> None:
    """Change a file the way a user or another process might: ``append`` a byte, or ``rewrite`` its last byte
    in place (same size; only the mtime tells). Returns once the change is visible in ``stat``."""
    before = os.stat(path)
    if how == "append":
        with open(path, "ab") as f:
            f.write(b"\0")
        return
    assert how == "rewrite", how
    for _ in range(200):  # until the clock tick moves the mtime (coarse on some filesystems)
        with open(path, "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
        now = os.stat(path)
        if now.st_mtime_ns != before.st_mtime_ns:
            assert now.st_size == before.st_size
            return
        __import__("time").sleep(0.01)
    raise AssertionError(f"the mtime of {path} did not change")


def has_accelerator() -> bool:
    return torch.accelerator.is_available()


def pytest_addoption(parser):
    parser.addoption(
        "--fake-accelerator", choices=["sync", "deferred"], default=None,
        help="run on the fake accelerator (tests/fakeaccel): the gpu tests run on it, in this mode",
    )  # fmt: skip


def pytest_configure(config):
    mode = config.getoption("--fake-accelerator")
    if mode is not None:
        import fakeaccel

        fakeaccel.enable(mode)
        # inductor has no code generator for the fake device: bitsandbytes' default backend tries to compile
        # its kernels and falls back to eager after each failure, a minute for one test. Compiled tests need
        # CUDA and skip here; eager is what runs on the fake device.
        torch._dynamo.config.disable = True


def pytest_terminal_summary(terminalreporter):
    import fakeaccel

    if fakeaccel.enabled():
        terminalreporter.write_line(
            f"fake accelerator: {fakeaccel.mode()} mode, built (or its cached build loaded) in "
            f"{fakeaccel.build_seconds:.1f} s"
        )


def pytest_collection_modifyitems(config, items):
    import fakeaccel

    skip = pytest.mark.skip(reason="needs an accelerator (run on a GPU machine, or pass --fake-accelerator)")
    skip_fake = pytest.mark.skip(reason="needs the fake accelerator (pass --fake-accelerator=deferred or sync)")
    for item in items:
        if "gpu" in item.keywords and not has_accelerator():
            item.add_marker(skip)
        if "fakeaccel" in item.keywords and not fakeaccel.enabled():
            item.add_marker(skip_fake)


def save_tokenizer(folder, vocab_size: int) -> None:
    """A word-level tokenizer of ``vocab_size`` entries (``w0`` ... and three specials at the end) with a
    plain chat template, saved into ``folder``: enough for `weightlift generate` on a random model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 3)}
    vocab.update({"<unk>": vocab_size - 3, "<s>": vocab_size - 2, "</s>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder)


CONVERT_BODY = """
from pathlib import Path
import gguf, safetensors.torch, transformers.integrations.gguf, transformers.modeling_gguf_pytorch_utils
from transformers import AutoConfig, AutoTokenizer
from weightlift.convert import convert_gguf
from weightlift.hf import smollm2_file
base = reset_peak()
convert_gguf(smollm2_file(), dtype=torch.float32, cache_dir=Path(sys.argv[1]))
print(base, status("VmHWM"))
"""


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory, request):
    """SmolLM2 converted to float32 (`weightlift.convert`) in a cache folder: ``(cache, folder, base, peak)``,
    written by a fresh interpreter that reports its baseline and peak RSS (bytes) while this one loads the
    GGUF the transformers way for comparison. Session-wide: CLI runs of `smollm2` pass ``--cache-dir cache``."""
    cache = tmp_path_factory.mktemp("cache")
    proc = subprocess.Popen(
        [sys.executable, "-c", RSS_PRELUDE + CONVERT_BODY, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        request.getfixturevalue("smollm2")
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    base, peak = map(int, out.strip().splitlines()[-1].split())
    from weightlift.convert import converted_folder
    from weightlift.hf import smollm2_file

    return cache, converted_folder(smollm2_file(), dtype=torch.float32, cache_dir=cache), base, peak


@pytest.fixture(autouse=True)
def _no_pageable_async_copies(request):
    """On the fake accelerator, every gpu test ends with no copy issued non-blocking from pageable host
    memory: a real device copies those synchronously, so the overlap they were meant for is lost."""
    import fakeaccel

    if not fakeaccel.enabled() or "gpu" not in request.keywords:
        yield
        return
    fakeaccel.reset_counters()
    yield
    assert fakeaccel.counters()["pageable_async_copies"] == 0, fakeaccel.counters()
