"""Mixture of experts from disk: whole layers against expert by expert, one run, every row against its baselines.

A random Qwen3-MoE (bf16, 128 experts, top-8, about 1.2 GiB) decodes greedily with its KV cache. The disk
rows stream the offloaded layers from the model's layer cache, mapped (a CPU target); before every decode
token the page cache of that file is emptied (``posix_fadvise(DONTNEED)``), so each token reads what it
needs from the disk. Rows:

- ``resident``: the model in RAM, no offloading (the reference for equality and the speed ceiling);
- ``whole layers``: weightlift's disk tier with ``experts=None``;
- ``expert level``: the same with ``experts="auto"`` (and each lookahead);
- ``accelerate disk_offload``: accelerate's disk offload of the same model, when accelerate is installed;
- ``host tier``: the layers copied from host RAM into 3 slots for 6 layers (the path an accelerator
  takes, here a CPU memcpy), whole layers against expert level, with bytes moved per token from the report;
- ``bound``: the bytes a token needs (every offloaded dense part plus top-k experts per layer), divided by
  the cold sequential read rate of the same cache file, measured in the same run.

Each row gives bytes read from storage per decode token (``/proc/self/io`` ``read_bytes``), decode tokens/s,
and whether its tokens and last logits equal the resident model's (``torch.equal``). Warm rows (page cache
full) compare whole layers and expert level again. Lookahead precision and the share of experts found in
place are measured with the random routers and with routers given structure (every layer's router a
perturbed copy of the first one, so consecutive layers choose alike, as trained models tend to).

    python benchmarks/moe_bench.py [--tokens 8] [--layers 6] [--folder /tmp/wl-moe]

Writes JSON lines to benchmarks/results/moe.jsonl (and prints them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import weightlift
from bench import evict, plain_read  # benchmarks/bench.py: drop a folder from the page cache; one timed read

RESULTS = Path(__file__).parent / "results"


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def build(layers: int, experts: int, top_k: int, structured: bool, seed: int = 0):
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(
        vocab_size=4096, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        intermediate_size=2048, moe_intermediate_size=256, num_experts=experts, num_experts_per_tok=top_k,
        num_hidden_layers=layers, decoder_sparse_step=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = tf.Qwen3MoeForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    if structured:  # consecutive layers route alike: each router a perturbed copy of the first
        first = model.model.layers[0].mlp.gate.weight
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.weight.copy_(first + 0.3 * first.std() * torch.randn_like(first))
    return model


def decode(model, ids: torch.Tensor, tokens: int, before_token=None) -> tuple[list[int], torch.Tensor, float, int]:
    """Greedy decode with the KV cache: (tokens, last logits, decode seconds, bytes read while decoding)."""
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq, seconds, read = [int(nxt)], 0.0, 0
        for _ in range(tokens):
            if before_token is not None:
                before_token()
            r0, t0 = read_bytes(), time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            seconds += time.perf_counter() - t0
            read += read_bytes() - r0
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq.append(int(nxt))
    return seq, out.logits[:, -1].clone(), seconds, read


def moved_between(handle, before, after) -> int:
    """Bytes the offloaded layers moved between two of ``handle``'s reports: dense parts and experts at expert
    level, else copies x the layer copy size (every layer of these models is the same size)."""
    if after.experts is not None:
        e, b = after.experts, before.experts
        return e.dense_moved + e.experts_moved - b.dense_moved - b.experts_moved
    return (after.copies - before.copies) * handle.layers[0].master.layout.nbytes


def run(model, ids, tokens: int, ref, base: dict, disk: Path, name: str, config, cold: bool) -> dict:
    """One offloaded row: decode under ``config`` (page cache emptied before every token when ``cold``)."""
    ref_seq, ref_logits = ref
    with weightlift.offload(model, device="cpu", config=config) as handle:
        before = handle.report()
        seq, logits, secs, read = decode(model, ids, tokens, (lambda: evict(disk)) if cold else None)
        rep = handle.report()
        moved = moved_between(handle, before, rep)
    row = {**base, "row": name, "page_cache": "emptied before every token" if cold else "warm",
           "tokens_per_s": tokens / secs, "read_per_token": read / tokens,
           "equal": seq == ref_seq and torch.equal(logits, ref_logits),
           "moved_per_token_prefill_included": moved / tokens}  # fmt: skip
    if rep.experts is not None:
        e = rep.experts
        row.update(precision=e.precision, in_place=e.hits / max(e.used, 1), moved_per_token=e.moved_per_token,
                   whole_forwards=e.whole, routed_forwards=e.routed,
                   active_per_token=e.dense_bytes + base["top_k"] * e.stacks * e.expert_bytes // e.experts)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--folder", default="/tmp/weightlift-moe-bench")
    ap.add_argument("--out", default=str(RESULTS / "moe.jsonl"))
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"Python {platform.python_version()}")  # fmt: skip
    rows = []

    def emit(row: dict) -> None:
        row = {"bench": "moe", "machine": machine, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    ids = torch.tensor([[1, 17, 923, 44, 301, 2048]])
    for structured in (False, True):
        routers = "structured" if structured else "random"
        model = build(args.layers, args.experts, args.top_k, structured)
        total = sum(p.untyped_storage().nbytes() for p in model.parameters())
        ref_seq, ref_logits, ref_s, ref_read = decode(model, ids, args.tokens)
        ref = (ref_seq, ref_logits)
        base = {"routers": routers, "model_bytes": total, "experts": args.experts, "top_k": args.top_k,
                "layers": args.layers, "tokens": args.tokens}  # fmt: skip
        emit({**base, "row": "resident", "tokens_per_s": args.tokens / ref_s, "read_per_token": ref_read / args.tokens,
              "equal": True})  # fmt: skip
        disk = folder / routers

        whole = dict(source="disk", disk_path=disk, experts=None)
        level = dict(source="disk", disk_path=disk)
        results = {}
        for name, cfg in (("whole layers", whole), ("expert level", level),
                          ("expert level, lookahead previous", {**level, "expert_lookahead": "previous"}),
                          ("expert level, lookahead router", {**level, "expert_lookahead": "router"})):  # fmt: skip
            if structured and name == "whole layers":
                continue
            results[name] = run(model, ids, args.tokens, ref, base, disk, name, weightlift.OffloadConfig(**cfg), True)
        active = results["expert level"]["active_per_token"]
        rate = plain_read(next(disk.glob("weightlift-*.safetensors")), cold=True)
        for row in results.values():
            if not structured:
                row["vs_whole_layers"] = row["tokens_per_s"] / results["whole layers"]["tokens_per_s"]
            row["read_vs_active"] = row["read_per_token"] / active
            row["vs_bound"] = row["tokens_per_s"] / (rate / active)
            emit(row)
        emit({**base, "row": "bound", "cold_read_rate": rate, "active_per_token": active,
              "tokens_per_s": rate / active})  # fmt: skip
        if not structured:
            warm_whole = run(model, ids, args.tokens, ref, base, disk, "whole layers",
                             weightlift.OffloadConfig(**whole), False)  # fmt: skip
            warm_level = run(model, ids, args.tokens, ref, base, disk, "expert level",
                             weightlift.OffloadConfig(**level), False)  # fmt: skip
            for row in (warm_whole, warm_level):
                row["vs_whole_layers"] = row["tokens_per_s"] / warm_whole["tokens_per_s"]
                emit(row)
            # the slot path an accelerator takes: layers copied from host RAM into 3 slots for 6 layers
            slots = dict(prefetch_step=2)
            kinds = (("whole layers", {"experts": None}), ("expert level", {}),
                     ("expert level, lookahead previous", {"expert_lookahead": "previous"}))
            host = [run(model, ids, args.tokens, ref, base, disk, f"host tier, {name}",
                        weightlift.OffloadConfig(**slots, **how), False) for name, how in kinds]  # fmt: skip
            for row in host:
                row["page_cache"] = "n/a (host RAM)"
                row["vs_whole_layers"] = row["tokens_per_s"] / host[0]["tokens_per_s"]
                emit(row)
            accelerate_row(model, ids, args.tokens, ref_seq, ref_logits, folder, base, emit)
        del model
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def accelerate_row(model, ids, tokens, ref_seq, ref_logits, folder: Path, base: dict, emit) -> None:
    try:
        from accelerate import disk_offload
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError:
        emit({**base, "row": "accelerate disk_offload", "skipped": "accelerate is not installed"})
        return
    import copy

    target = folder / "accelerate"
    clone = copy.deepcopy(model)
    try:
        disk_offload(clone, str(target), execution_device="cpu")
        seq, logits, secs, read = decode(clone, ids, tokens, lambda: evict(target))
        emit({**base, "row": "accelerate disk_offload", "page_cache": "emptied before every token",
              "tokens_per_s": tokens / secs, "read_per_token": read / tokens,
              "equal": seq == ref_seq and torch.equal(logits, ref_logits)})  # fmt: skip
        remove_hook_from_submodules(clone)
    except Exception as err:  # a peer that fails is a row that says so
        emit({**base, "row": "accelerate disk_offload", "failed": f"{type(err).__name__}: {err}"[:300]})


if __name__ == "__main__":
    sys.exit(main())
