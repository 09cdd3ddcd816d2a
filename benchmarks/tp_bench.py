"""Tensor parallel on this machine: N ranks (gloo on the CPU), decode tokens/s resident against offloaded, one run.

A random Llama (bf16, 8 layers, hidden 1024; about 0.2 GB) is saved once and loaded on every rank with
``tp_plan="auto"`` (every weight a DTensor shard). Each rank decodes greedily with the KV cache: resident,
then every layer offloaded (host tier, prefetch step 1), then from a layer cache per rank (disk tier read
into slots). Rows give decode tokens/s (rank 0's clock; the ranks run in lock step), each rank's offloaded
and device bytes, and whether every rank's tokens and last logits equal its resident run (``torch.equal``).
Caveat: gloo over loopback on 2 shared cores is no fast interconnect; the all-reduces of each layer cost
more here than on NVLink, and both ranks share the same two cores.

    python benchmarks/tp_bench.py [--ranks 2] [--tokens 16]   (launches torchrun itself)

Writes JSON lines to benchmarks/results/tp.jsonl (and prints them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def decode(model, ids, tokens: int):
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        seq, t0 = [int(nxt)], time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq.append(int(nxt))
        seconds = time.perf_counter() - t0
    return seq, out.logits[:, -1].clone(), seconds


def rank_main(args) -> None:
    import torch.distributed as dist
    import transformers as tf

    import weightlift

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    folder = Path(args.folder)
    if rank == 0:
        cfg = tf.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
                             num_key_value_heads=8, num_hidden_layers=8, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0)  # fmt: skip
        torch.manual_seed(0)
        tf.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder / "model")
    dist.barrier()
    model = tf.AutoModelForCausalLM.from_pretrained(folder / "model", tp_plan="auto", dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 17, 923, 44, 301, 2048, 7, 99]])
    ref_seq, ref_logits, ref_s = decode(model, ids, args.tokens)
    rows = [{"row": "resident", "tokens_per_s": args.tokens / ref_s, "equal": True}]
    configs = {"offloaded, host tier": weightlift.OffloadConfig(prefetch_step=1),
               "offloaded, disk tier (read into slots)": weightlift.OffloadConfig(
                   prefetch_step=1, source="disk", disk_path=folder / "cache", mmap=False)}  # fmt: skip
    for name, config in configs.items():
        with weightlift.offload(model, device="cpu", config=config) as handle:
            seq, logits, secs = decode(model, ids, args.tokens)
            report = handle.report()
        rows.append({"row": name, "tokens_per_s": args.tokens / secs,
                     "equal": seq == ref_seq and bool(torch.equal(logits, ref_logits)),
                     "offloaded_bytes": report.offloaded_bytes, "device_bytes": report.device_bytes})  # fmt: skip
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"Python {platform.python_version()}")  # fmt: skip
        out = []
        for i, row in enumerate(rows):
            line = {"bench": "tp", "machine": machine, "ranks": world, "backend": "gloo", "tokens": args.tokens,
                    **{k: v for k, v in row.items() if k not in ("equal", "offloaded_bytes", "device_bytes")},
                    "equal_on_every_rank": all(g[i]["equal"] for g in gathered)}  # fmt: skip
            if "device_bytes" in row:
                line["device_bytes_per_rank"] = [g[i]["device_bytes"] for g in gathered]
                line["offloaded_bytes_per_rank"] = [g[i]["offloaded_bytes"] for g in gathered]
                line["vs_resident"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
            out.append(line)
            print(json.dumps(line), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in out))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--out", default=str(RESULTS / "tp.jsonl"))
    args = ap.parse_args()
    if "RANK" in os.environ:
        rank_main(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="weightlift-tp-") as folder:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.ranks}",
               __file__, "--tokens", str(args.tokens), "--folder", args.folder or folder,
               "--out", args.out]  # fmt: skip
        return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
