"""Real-shaped checkpoints with random weights, written once into a cache folder as a hub folder holds them:
``config.json``, ``generation_config.json``, sharded safetensors with ``model.safetensors.index.json``, and a
tokenizer (SmolLM2's, from the embedded GGUF: its ids are all below these vocabularies).

Weights are drawn from a fixed seed as ``from_config`` initialises a Llama (normal, std
``initializer_range``, for every linear and embedding; norms at one), one tensor at a time, so writing
never holds more than a shard. ``python benchmarks/synth.py SHAPE`` writes one and prints its folder;
``--delete`` removes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.1-8B: about 16 GB in bfloat16
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    # the quick run: about 3 GB in bfloat16 (a Llama-3.2-1B shape with its lm_head untied)
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
}  # fmt: skip
SHARD = 2 << 30  # bytes per safetensors file, about


def cache_root() -> Path:
    from weightlift.plan import default_cache_dir

    return Path(default_cache_dir()) / "bench-models"


def folder_of(shape: str) -> Path:
    return cache_root() / f"{shape}-bf16"


def _tensors(config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of a LlamaForCausalLM with ``config``, in the order of its state dict."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    out = []
    for name, t in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out.append((name, tuple(t.shape), "ones" if "norm" in name else "normal"))
    return out


def write(shape: str, seed: int = 0) -> Path:
    """The folder of ``shape``, written unless it is there (a ``.complete`` marker says it was finished)."""
    import transformers as tf
    from safetensors.torch import save_file
    from tqdm import tqdm

    from weightlift.hf import smollm2_file

    folder = folder_of(shape)
    if (folder / ".complete").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = tf.LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, dtype="bfloat16", bos_token_id=1,
                            eos_token_id=2)  # fmt: skip
    specs = _tensors(config)
    total = sum(2 * torch.Size(s).numel() for _, s, _ in specs)
    generator = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(partial / name), metadata={"format": "pt"})
        files.append(name)
        for key in shard:
            weight_map[key] = name
        shard, shard_bytes = {}, 0

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {shape} (bfloat16)") as bar:
        for name, size, init in specs:
            if init == "ones":
                t = torch.ones(size, dtype=torch.bfloat16)
            else:
                t = torch.empty(size, dtype=torch.float32).normal_(0.0, config.initializer_range, generator=generator)
                t = t.to(torch.bfloat16)
            shard[name] = t
            shard_bytes += t.numel() * 2
            bar.update(t.numel() * 2)
            if shard_bytes >= SHARD:
                flush()
        if shard:
            flush()
    n = len(files)
    renamed = {f: f.replace(".safetensors", f"-of-{n:05d}.safetensors") for f in files}
    for old, new in renamed.items():
        (partial / old).rename(partial / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.architectures = ["LlamaForCausalLM"]  # as a hub folder says it (llama.cpp's converter reads it)
    config.save_pretrained(partial)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(partial)
    gguf = smollm2_file()
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(partial)
    (partial / ".complete").touch()
    partial.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description="write (or --delete) a real-shaped random checkpoint")
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--delete", action="store_true")
    args = parser.parse_args()
    if args.delete:
        shutil.rmtree(folder_of(args.shape), ignore_errors=True)
        return
    print(write(args.shape))


if __name__ == "__main__":
    main()
