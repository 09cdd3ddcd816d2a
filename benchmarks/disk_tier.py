"""Disk tier on this machine: SmolLM2 greedy decode, cold page cache before each run, side by side.

Compared in one run: resident (baseline); weightlift disk tier with prefetch (step 2); the same with
prefetch off (each layer read when it runs); accelerate's ``disk_offload`` (if installed); and a plain
sequential read of the cache file, for the read bandwidth the disk allows. Writes JSON lines to
``benchmarks/results/disk_tier.jsonl`` and prints a Markdown table.

    .venv/bin/python benchmarks/disk_tier.py [--tokens 16] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import weightlift
from weightlift.hf import chat_ids, load_gguf, measure_decode, smollm2_file

PROMPT = "Explain in two sentences why the sky is blue."


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache (POSIX_FADV_DONTNEED), so the next read hits the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_only(cache, evict_first: Path | None) -> float:
    """Seconds to read every layer of the cache into one slot-sized buffer with weightlift's own reader."""
    if evict_first is not None:
        evict(evict_first)
    slot = torch.empty(max(c.nbytes for c in cache.layers.values()), dtype=torch.uint8)
    start = time.perf_counter()
    for index in cache.layers:
        cache.read_into(index, slot)
    return time.perf_counter() - start


def plain_read(path: Path) -> float:
    """Bytes per second of one cold sequential read of ``path`` in 16 MiB chunks."""
    evict(path.parent)
    buffer = bytearray(16 << 20)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return path.stat().st_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "disk_tier.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(args.cache_dir or tempfile.mkdtemp(prefix="weightlift-bench-"))
    machine = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__}
    model, tokenizer = load_gguf(smollm2_file())
    ids = chat_ids(tokenizer, PROMPT)
    rows = []

    def record(name: str, result: dict, **extra) -> None:
        row = {**machine, "model": "SmolLM2-135M-Instruct (fp32)", "scenario": name, **extra,
               **{k: v for k, v in result.items() if k != "tokens"}}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))

    resident = measure_decode(model, ids, args.tokens)
    threads = torch.get_num_threads()
    record("resident", resident, baseline="itself", threads=threads)
    base = resident["decode_tokens_per_s"]
    runs = [
        ("weightlift disk, prefetch step 2", 2, threads, False),
        ("weightlift disk, prefetch off", 0, threads, False),
    ]
    if threads > 1:  # on a CPU target the reader needs a core of its own to overlap with compute
        runs.append(("weightlift disk, prefetch step 2, one core left to the reader", 2, threads - 1, False))
    # a model larger than RAM: no layer is in the page cache when it is needed
    runs += [(f"evicted before every token: prefetch {'off' if step == 0 else 'step 2'}, {n} threads", step, n, True)
             for step, n in [(0, threads), (2, max(1, threads - 1))]]  # fmt: skip
    for name, step, n, cold in runs:
        torch.set_num_threads(n)
        config = weightlift.OffloadConfig(source="disk", disk_path=str(work / "weightlift"), prefetch_step=step)
        with weightlift.offload(model, device="cpu", config=config) as handle:
            evict(work / "weightlift")
            result = measure_decode(model, ids, args.tokens, (lambda: evict(work / "weightlift")) if cold else None)
            report = handle.report()
            copy_only = read_only(handle.cache, work / "weightlift" if cold else None)
        torch.set_num_threads(threads)
        assert torch.equal(result["tokens"], resident["tokens"]), name
        per_token = report.offloaded_bytes
        step_time = 1 / result["decode_tokens_per_s"]
        # overlap_efficiency = max(compute-only, copy-only) / offloaded time per token; compute-only is the
        # resident step time, copy-only a read of every layer by the same reader, in this process
        record(name, result, baseline=f"resident at {threads} threads", threads=n,
               slowdown=base / result["decode_tokens_per_s"], read_bytes_per_token=per_token,
               read_bandwidth=per_token * result["decode_tokens_per_s"], cache_file=report.source,
               copy_only_s=copy_only, compute_only_s=1 / base,
               overlap_efficiency=max(copy_only, 1 / base) / step_time)  # fmt: skip
    cache_file = Path(rows[-1]["cache_file"])
    bandwidth = plain_read(cache_file)
    record("plain sequential read of the cache file (cold)", {"read_bandwidth": bandwidth}, baseline="none")
    try:
        from accelerate import disk_offload
    except ImportError:
        disk_offload = None
    if disk_offload is not None:
        disk_offload(model, str(work / "accelerate"), execution_device=torch.device("cpu"))
        evict(work / "accelerate")
        result = measure_decode(model, ids, args.tokens)
        same = torch.equal(result["tokens"], resident["tokens"])
        record("accelerate disk_offload (all weights, no prefetch)", result, baseline=f"resident at {threads} threads",
               threads=threads, slowdown=base / result["decode_tokens_per_s"], same_tokens=same)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("\n| scenario | decode tokens/s | slowdown vs resident | read bandwidth | overlap efficiency |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        tps, bw, slow = row.get("decode_tokens_per_s"), row.get("read_bandwidth"), row.get("slowdown")
        eff = row.get("overlap_efficiency")
        cells = [f"{tps:.1f}" if tps else "-", f"{slow:.2f}x" if slow else "-", f"{bw / 1e9:.2f} GB/s" if bw else "-",
                 f"{eff:.2f}" if eff else "-"]  # fmt: skip
        print(f"| {row['scenario']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
