"""The device expert cache: hit rates, bytes over the link and decode speed, against no cache, in one run.

The MoE of `moe_bench.py` (a random Qwen3-MoE in bf16: 6 layers, 128 experts of 1.5 MiB, top-8, 1.26 GB)
decodes greedily with its KV cache on the slot path an accelerator takes: every layer offloaded, copied
from host RAM into 3 slots (here a CPU memcpy; on a CPU the cache's copies are memcpys too, so tokens/s
here says little of an accelerator, where the link is 50x slower than device memory). Rows, per router
kind (random, and structured: every layer's router a perturbed copy of the first, as in `moe_bench.py`):

- ``no cache``: expert level as landed (the baseline of every other row of its kind);
- ``cache N%``: an expert cache holding N% of all experts, ``lru`` and ``lfu``.

Each row gives the cache's hit rate (experts found / looked for), bytes moved over the link per decode
token (dense parts + experts not found; from the report), bytes copied from the cache per token, decode
tokens/s, equality of tokens and last logits with the resident model (``torch.equal``), and the hit rate the
planner predicts for that cache: the same policy replayed over the prompt's tokens (`expert_cache.replay`
on `experts.token_routes` of one prefill of a random prompt as long as the decode), to compare with what
decoding found. Last, rows replayed only (no model): routing drawn uniformly, the hard case for a cache.
Random models route far from uniformly (their hidden states collapse: over 33 random prompt tokens the
deeper layers chose 20-36 of 128 experts, measured), and their greedy decode repeats tokens, both of which
flatter the decode hit rate; trained MoEs are trained to balance their experts.

    python benchmarks/expert_cache_bench.py [--tokens 32] [--layers 6]

Writes JSON lines to benchmarks/results/expert_cache.jsonl (and prints them).
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
from moe_bench import RESULTS, build
from weightlift.expert_cache import replay
from weightlift.experts import token_routes


def decode(model, ids: torch.Tensor, tokens: int) -> tuple[list[int], torch.Tensor, float]:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq, seconds = [int(nxt)], 0.0
        for _ in range(tokens):
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            seconds += time.perf_counter() - t0
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq.append(int(nxt))
    return seq, out.logits[:, -1].clone(), seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--shares", default="0.125,0.25,0.5")
    ap.add_argument("--out", default=str(RESULTS / "expert_cache.jsonl"))
    args = ap.parse_args()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"Python {platform.python_version()}")  # fmt: skip
    rows = []

    def emit(row: dict) -> None:
        row = {"bench": "expert_cache", "machine": machine, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)

    torch.manual_seed(1)
    ids = torch.randint(3, 4096, (1, args.tokens + 1))  # the planner's sample of routing: as many tokens as decode
    keys = args.layers * args.experts
    for structured in (False, True):
        routers = "structured" if structured else "random"
        model = build(args.layers, args.experts, args.top_k, structured)
        plain = decode(model, ids[:, :1], args.tokens)  # the resident reference: (tokens, last logits, seconds)
        routes = token_routes(list(model.model.layers), lambda m=model: m(input_ids=ids))
        base = {"routers": routers, "experts": args.experts, "top_k": args.top_k, "layers": args.layers,
                "tokens": args.tokens, "prompt_tokens": ids.shape[1]}  # fmt: skip
        emit({**base, "row": "resident", "tokens_per_s": args.tokens / plain[2], "equal": True})
        for share in [0.0, *map(float, args.shares.split(","))]:
            for policy in ("lru",) if share == 0 else ("lru", "lfu"):
                entries = int(share * keys)
                config = weightlift.OffloadConfig(prefetch_step=2, expert_cache=entries or None,
                                                  expert_cache_policy=policy)  # fmt: skip
                with weightlift.offload(model, device="cpu", config=config) as handle:
                    with torch.inference_mode():
                        model(input_ids=ids)  # the prompt once: its counts are taken off below
                    before = handle.report().experts
                    seq, logits, secs = decode(model, ids[:, :1], args.tokens)
                    e = handle.report().experts
                # decoding from the first prompt token only: a prefill of 1 token and `tokens` decode steps
                steps = args.tokens + 1
                row = {**base, "row": "no cache" if not entries else f"cache {share:.1%}, {policy}",
                       "entries": entries, "cache_bytes": e.cache_bytes, "policy": policy if entries else None,
                       "tokens_per_s": args.tokens / secs,
                       "link_per_token": (e.dense_moved + e.experts_moved - before.dense_moved
                                          - before.experts_moved) / steps,
                       "from_cache_per_token": (e.cached_bytes - before.cached_bytes) / steps,
                       "hit_rate": ((e.cached - before.cached) / (e.sought - before.sought)
                                    if e.sought > before.sought else None),
                       "evictions": e.evictions - before.evictions}  # fmt: skip
                row["equal"] = seq == plain[0] and torch.equal(logits, plain[1])
                if entries:
                    found = replay(routes, entries, policy)
                    row["predicted_hit_rate"] = sum(f for _, f in found.values()) / sum(s for s, _ in found.values())
                    none = rows_by(rows, routers, "no cache")
                    row["link_vs_no_cache"] = row["link_per_token"] / none["link_per_token"]
                    row["speed_vs_no_cache"] = row["tokens_per_s"] / none["tokens_per_s"]
                emit(row)
        del model
    # routing with no structure at all (each token's experts drawn uniformly), replayed only: the hard case
    gen = torch.Generator().manual_seed(0)
    uniform = [(layer, [(layer, 0, int(e)) for e in sorted(torch.randperm(args.experts, generator=gen)[:args.top_k])])
               for _ in range(args.tokens + 1) for layer in range(args.layers)]  # fmt: skip
    for share in map(float, args.shares.split(",")):
        for policy in ("lru", "lfu"):
            found = replay(uniform, int(share * keys), policy)
            emit({"routers": "uniform (replayed, no model)", "row": f"cache {share:.1%}, {policy}", "policy": policy,
                  "entries": int(share * keys), "tokens": args.tokens + 1,
                  "predicted_hit_rate": sum(f for _, f in found.values()) / sum(s for s, _ in found.values())})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def rows_by(rows: list, routers: str, name: str) -> dict:
    return next(r for r in rows if r.get("routers") == routers and r.get("row") == name)


if __name__ == "__main__":
    sys.exit(main())
