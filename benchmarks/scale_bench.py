"""A model bigger than RAM, on this machine (`make bench-scale`): weightlift against the peers with RAM made
short for real, side by side in one invocation.

1. A real-shaped random checkpoint (`synth.py`: ``llama-8b``, 16 GB in bfloat16, or ``llama-1b``, 3 GB, for a
   quick run) is written once into the cache.
2. Measured without any squeeze: the disk's sequential read rate (page cache emptied first) and the
   resident model (``from_pretrained``, the reference tokens and compute time per token).
3. For each RAM fraction, a balloon (`balloon.py`) holds anonymous memory until ``MemAvailable`` is that
   fraction of the model; then each row runs in its own process (page cache emptied before it, its
   ``oom_score_adj`` raised so that the kernel kills a row that overruns, not the balloon), and reports its
   peak RSS (VmHWM), bytes read from storage (``/proc/self/io``) per decode token, prefill seconds, time to
   first token, decode tokens/s and its tokens.
4. Beside them the bound: per decode token, the bytes that cannot stay in RAM (model - available) over the
   disk's read rate, plus the resident compute time.

Rows: ``weightlift generate FOLDER`` with no flags (the CLI, in the row's process); weightlift
``load_streaming`` with an explicit budget (available less 1 GiB); plain transformers ``from_pretrained`` (the
page cache is the only offloader); accelerate ``device_map="auto"`` with ``max_memory`` and an
``offload_folder``; diffusers group offloading to disk; AirLLM (``pip install airllm``: it writes its own
per-layer files into the row's folder); llama.cpp (``pip install llama-cpp-python``, built here from source)
on the same weights converted to a BF16 GGUF beside the folder (`gguf_of`), computing on them mapped, as it
does by default. A row that dies, or whose library is missing, is reported with how it died.

Writes ``benchmarks/results/scale.jsonl`` and ``scale.md``. Usage:
``.venv/bin/python benchmarks/scale_bench.py [--shape llama-1b|llama-8b] [--fractions 0.5,0.25] [--tokens 8]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROMPT = "Explain in two sentences why the sky is blue."
ROWS = ["weightlift (no flags)", "weightlift (budget)", "transformers", "accelerate", "diffusers", "airllm",
        "llama.cpp"]


def gguf_of(folder: str | Path) -> Path:
    """llama.cpp's row reads the same weights as a BF16 GGUF beside the folder (``FOLDER.gguf``, written by
    llama.cpp's ``convert_hf_to_gguf.py FOLDER --outtype bf16``); the row says so when it is missing."""
    return Path(f"{folder}.gguf")


# ------------------------------------------------------------------------------------------ in a row process


def _proc(path: str, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                parts = line.split()
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    raise KeyError(key)


def _read() -> int:
    return _proc("/proc/self/io", "read_bytes")


def decode(model, ids, tokens: int) -> dict:
    """Prefill and greedy decode with the KV cache, timed, with the bytes read from storage per decode step."""
    import torch

    with torch.inference_mode():
        start, before = time.perf_counter(), _read()
        out = model(ids, use_cache=True)
        prefill, prefill_read = time.perf_counter() - start, _read() - before
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated, steps, reads = [nxt], [], []
        for _ in range(tokens - 1):
            start, before = time.perf_counter(), _read()
            out = model(nxt, past_key_values=past, use_cache=True)
            steps.append(time.perf_counter() - start)
            reads.append(_read() - before)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            generated.append(nxt)
    return {"prefill_s": prefill, "time_to_first_token_s": prefill, "prefill_read_bytes": prefill_read,
            "decode_tokens_per_s": len(steps) / sum(steps), "decode_s": steps,
            "read_bytes_per_decode_token": statistics.median(reads) if reads else None,
            "tokens": torch.cat(generated, 1)[0].tolist()}  # fmt: skip


def llama_cpp_row(folder: str, tokens: int) -> dict:
    """llama.cpp (llama-cpp-python) on the same weights as a BF16 GGUF, mapped as it maps by default, 2
    threads, greedy over the same prompt ids as the other rows."""
    import numpy as np
    from llama_cpp import Llama

    ids = _ids(folder)[0].tolist()
    started = time.perf_counter()
    if not gguf_of(folder).is_file():
        raise SystemExit(f"no {gguf_of(folder)}: convert the folder with llama.cpp's convert_hf_to_gguf.py")
    llm = Llama(model_path=str(gguf_of(folder)), n_ctx=len(ids) + tokens + 8, n_threads=os.cpu_count(),
                n_batch=len(ids), logits_all=True, verbose=False)  # fmt: skip
    setup = time.perf_counter() - started
    start, before = time.perf_counter(), _read()
    llm.eval(ids)
    prefill, prefill_read = time.perf_counter() - start, _read() - before
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    generated, steps, reads = [nxt], [], []
    for _ in range(tokens - 1):
        start, before = time.perf_counter(), _read()
        llm.eval([nxt])
        steps.append(time.perf_counter() - start)
        reads.append(_read() - before)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(nxt)
    return {"setup_s": setup, "prefill_s": prefill, "time_to_first_token_s": prefill,
            "prefill_read_bytes": prefill_read, "decode_tokens_per_s": len(steps) / sum(steps), "decode_s": steps,
            "read_bytes_per_decode_token": statistics.median(reads) if reads else None,
            "tokens": generated}  # fmt: skip


def _ids(folder: str):
    from weightlift.hf import chat_ids, tokenizer_of

    return chat_ids(tokenizer_of(Path(folder)), PROMPT)


def row(name: str, folder: str, tokens: int, work: str) -> dict:
    """One row, in this process; returns what it measured."""
    import torch

    with open("/proc/self/oom_score_adj", "w") as f:  # this row, not the balloon, goes if memory runs out
        f.write("1000")
    started = time.perf_counter()
    available = _proc("/proc/meminfo", "MemAvailable")
    out: dict = {"available_at_start": available, "rss_at_start": _proc("/proc/self/status", "VmRSS")}
    if name == "weightlift (no flags)":
        import contextlib
        import io

        from weightlift.cli import main

        buffer, before = io.StringIO(), _read()
        with contextlib.redirect_stdout(buffer):
            code = main(["generate", folder, "--prompt", PROMPT, "--tokens", str(tokens), "--json",
                         "--cache-dir", work])  # fmt: skip
        result = json.loads(buffer.getvalue())
        out["tokens"] = result["token_ids"]
        predicted = result.get("predicted_decode_tokens_per_s")
        out.update(exit=code, read_bytes=_read() - before, tokens_per_s=result["tokens_per_s"],
                   decode_tokens_per_s=result["decode_tokens_per_s"] or result["tokens_per_s"],
                   time_to_first_token_s=result["time_to_first_token_s"], text=result["text"],
                   layers_offloaded=result["layers_offloaded"], plan=(result["plan"] or {}).get("summary"),
                   budget=(result["plan"] or {}).get("budget"), predicted_decode_s=1 / predicted if predicted else None,
                   note="decode tokens/s after the first token (the CLI's own figure)")  # fmt: skip
    elif name == "llama.cpp":
        out.update(llama_cpp_row(folder, tokens))
    else:
        ids = _ids(folder)
        if name == "weightlift (budget)":
            from weightlift.hf import load_streaming

            budget = available - (1 << 30)
            model, handle = load_streaming(folder, budget=budget)
            out.update(budget=budget, layers_offloaded=handle.report().layers_offloaded, plan=handle.plan.summary(),
                       predicted_decode_s=handle.plan.workloads["decode"].predicted_s)  # fmt: skip
        elif name in ("transformers", "resident"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        elif name == "accelerate":
            from transformers import AutoModelForCausalLM

            cap = max(available - (2 << 30), 1 << 30)  # what accelerate may keep in RAM; the rest to its folder
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="auto",
                                                         max_memory={"cpu": cap}, offload_folder=f"{work}/accelerate",
                                                         offload_state_dict=True).eval()  # fmt: skip
            out["max_memory"] = cap
        elif name == "diffusers":
            from diffusers.hooks import apply_group_offloading
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
            apply_group_offloading(model, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   offload_to_disk_path=f"{work}/diffusers")  # fmt: skip
        elif name == "airllm":  # AirLLM from PyPI (4.0): its own per-layer files, written into the row's folder
            from airllm import AutoModel

            model = AutoModel.from_pretrained(folder, device="cpu", dtype=torch.bfloat16,
                                              layer_shards_saving_path=f"{work}/airllm")  # fmt: skip
        else:
            raise SystemExit(f"unknown row {name!r}")
        out["setup_s"] = time.perf_counter() - started
        out.update(decode(model, ids, tokens))
    out["peak_rss_bytes"] = _proc("/proc/self/status", "VmHWM")
    out["wall_s"] = time.perf_counter() - started
    return out


# ------------------------------------------------------------------------------------------ the orchestrator


def evict_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evict(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            evict_file(path)


def read_rate(folder: Path, limit: int = 4 << 30) -> float:
    """Bytes per second the disk gives one sequential reader of the shards: ``O_DIRECT`` reads of 16 MiB (no
    page cache, no read-ahead window in the way; through the page cache one reader got 0.6-1.0 GB/s here
    where ``dd iflag=direct`` and weightlift's own reads got 1.3), over the first ``limit`` bytes."""
    import mmap

    buffer = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    total, start = 0, time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            while total < limit and (n := os.readv(fd, [buffer])) > 0:
                total += n
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start)


def run_row(name: str, folder: Path, tokens: int, timeout: int) -> dict:
    work = tempfile.mkdtemp(prefix="weightlift-scale-", dir="/var/tmp")
    try:
        evict(folder)
        if gguf_of(folder).is_file():
            evict_file(gguf_of(folder))
        argv = [sys.executable, __file__, "--row", name, "--folder", str(folder), "--tokens", str(tokens)]
        argv += ["--work", work]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": name, "error": f"did not finish in {timeout} s"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        how = "killed by the kernel (out of memory)" if proc.returncode == -9 else f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
        return {"row": name, "error": f"{how}{': ' + tail[0][:200] if tail and proc.returncode != -9 else ''}"}
    return {"row": name, **json.loads(lines[-1])}


def table(shape: str, rows: list[dict], machine: str) -> str:
    def size(n):
        return f"{n / 2**30:.2f} GiB" if n is not None else "-"

    lines = [f"{shape}, {machine}", "",
             "| RAM available | row | decode tok/s | vs bound | read per decode token | peak RSS | TTFT s | same |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        fraction = r.get("fraction")
        where = f"{fraction}x ({size(r.get('available'))})" if fraction else "all (no balloon)"
        if "error" in r:
            lines.append(f"| {where} | {r['row']} | {r['error']} | | | | | |")
            continue
        bound = r.get("bound_tokens_per_s")
        vs = f"{r['decode_tokens_per_s'] / bound:.2f}" if bound else "-"
        ttft = r.get("time_to_first_token_s")
        grown = r["peak_rss_bytes"] - r["rss_at_start"] if "rss_at_start" in r else None
        lines.append(f"| {where} | {r['row']} | {r['decode_tokens_per_s']:.3f} | {vs} | "
                     f"{size(r.get('read_bytes_per_decode_token'))} | {size(r.get('peak_rss_bytes'))} "
                     f"({size(grown)} above the start) | "
                     f"{'-' if ttft is None else f'{ttft:.1f}'} | {r.get('same_tokens', '-')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="weightlift and the peers on a model bigger than RAM")
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # one row, in this process
        print(json.dumps(row(args.row, args.folder, args.tokens, args.work)), flush=True)
        return
    sys.path.insert(0, str(HERE))
    from balloon import FLOOR, Balloon, mem_available
    from synth import write

    folder = write(args.shape)
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {mem_available() >> 30} GiB available unsqueezed"
    rate = read_rate(folder)
    print(f"{args.shape}: {model_bytes / 2**30:.2f} GiB; sequential read {rate / 1e9:.2f} GB/s", flush=True)
    reference = run_row("resident", folder, args.tokens, args.timeout)
    reference.update(fraction=None, shape=args.shape, model_bytes=model_bytes, read_rate=rate)
    rows = [reference]
    print(json.dumps({k: v for k, v in reference.items() if k != "decode_s"}), flush=True)
    compute = 1 / reference["decode_tokens_per_s"] if "error" not in reference else None
    for fraction in (float(f) for f in args.fractions.split(",")):
        leave = int(fraction * model_bytes)
        if leave < FLOOR:
            rows.append({"row": "all", "fraction": fraction, "error": f"{leave >> 20} MiB is below the balloon's "
                         f"floor of {FLOOR >> 20} MiB for a run"})  # fmt: skip
            continue
        with Balloon(leave):
            available = mem_available()
            bound = 1 / ((max(model_bytes - available, 0) / rate) + compute) if compute else None
            for name in args.rows.split(","):
                result = run_row(name, folder, args.tokens, args.timeout)
                result.update(fraction=fraction, available=available, bound_tokens_per_s=bound, shape=args.shape)
                if "tokens" in result and "tokens" in reference:
                    result["same_tokens"] = result["tokens"] == reference["tokens"]
                elif "text" in result and "tokens" in reference:
                    from transformers import AutoTokenizer

                    text = AutoTokenizer.from_pretrained(folder).decode(reference["tokens"], skip_special_tokens=True)
                    result["same_tokens"] = result["text"] == text
                rows.append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("decode_s", "plan")}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "scale.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"machine": machine, **r}) + "\n")
    text = table(args.shape, rows, machine)
    (RESULTS / f"scale-{args.shape}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
