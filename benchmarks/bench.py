"""weightlift against resident and the peers, on this machine, side by side in one run (`make bench`).

Scenarios (CPU target): SmolLM2 (the embedded model, every layer offloaded) and a random-weight
Llama built from a config, plain, torchao int8 and bitsandbytes nf4. Each row is measured in this
process against the resident run of the same model (`baseline`), and the peers run on the same model:
accelerate's ``disk_offload`` and diffusers' block-level group offloading to disk (CUDA streams do not
apply on a CPU target). The page cache is emptied (``POSIX_FADV_DONTNEED``) before every run; rows
marked "cold" also empty it before every token, as for a model larger than RAM.

Figures, defined once:
- ``slowdown`` = offloaded time per token / resident time per token;
- ``overlap_efficiency`` = max(compute-only, copy-only) / offloaded time per token, compute-only being
  the resident step and copy-only one pass of weightlift's reader over every layer (cold for cold rows);
- ``link_utilisation`` = bytes read per second while decoding / a plain sequential read of the same file
  (cold for cold rows, from the page cache otherwise).

Writes JSON lines to ``benchmarks/results/bench.jsonl`` and a Markdown table to
``benchmarks/results/summary.md``.  Usage: ``.venv/bin/python benchmarks/bench.py [--tokens 16] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import weightlift
from weightlift.hf import chat_ids, load_gguf, measure_decode, smollm2_file

PROMPT = "Explain in two sentences why the sky is blue."
RESULTS = Path(__file__).parent / "results"


def evict(folder: Path) -> None:
    """Drop ``folder``'s files from the page cache, so the next read hits the disk."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def plain_read(path: Path, cold: bool) -> float:
    """Bytes per second of one sequential read of ``path`` in 16 MiB chunks."""
    if cold:
        evict(path.parent)
    else:
        path.read_bytes()  # warm it
    buffer = bytearray(16 << 20)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return path.stat().st_size / (time.perf_counter() - start)


def read_only(cache, folder: Path, cold: bool) -> float:
    """Seconds for weightlift's reader to read every layer once into a slot-sized buffer."""
    if cold:
        evict(folder)
    slot = torch.empty(max(c.nbytes for c in cache.layers.values()), dtype=torch.uint8)
    start = time.perf_counter()
    for index in cache.layers:
        cache.read_into(index, slot)
    return time.perf_counter() - start


class Bench:
    def __init__(self, tokens: int, work: Path) -> None:
        self.tokens, self.work, self.rows = tokens, work, []
        self.machine = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}",
                        "torch": torch.__version__}  # fmt: skip
        self.threads = torch.get_num_threads()
        self.budget: int | None = None  # the host budget of the model being measured, on every row

    def record(self, model_name: str, scenario: str, result: dict, **extra) -> dict:
        row = {**self.machine, "model": model_name, "scenario": scenario, "threads": torch.get_num_threads(),
               "budget": self.budget,
               **{k: v for k, v in result.items() if k != "tokens"}, **extra}  # fmt: skip
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def resident(self, name: str, model, ids) -> dict:
        result = measure_decode(model, ids, self.tokens)
        self.record(name, "resident", result, baseline="itself")
        return result

    def weightlift(self, name, model, ids, base, scenario, *, step=2, threads=None, cold=False, budget=None, mmap=True):
        torch.set_num_threads(threads or self.threads)
        folder = self.work / f"weightlift-{name.split()[0]}"
        config = weightlift.OffloadConfig(source="disk", disk_path=str(folder), prefetch_step=step, host_budget=budget,
                                          mmap=mmap)  # fmt: skip
        try:
            with weightlift.offload(model, device="cpu", config=config) as handle:
                evict(folder)
                result = measure_decode(model, ids, self.tokens, (lambda: evict(folder)) if cold else None)
                report = handle.report()
                copy_only = read_only(handle.cache, folder, cold)
                plain = plain_read(handle.cache.path, cold)
        finally:
            torch.set_num_threads(self.threads)
        assert torch.equal(result["tokens"], base["tokens"]), f"{name}: {scenario} changed the tokens"
        step_time, base_step = 1 / result["decode_tokens_per_s"], 1 / base["decode_tokens_per_s"]
        rate = report.offloaded_bytes / step_time
        return self.record(name, scenario, result, baseline="resident, same run", step=step, cold=cold,
                           slowdown=step_time / base_step, overlap_efficiency=max(base_step, copy_only) / step_time,
                           link_utilisation=rate / plain, read_bandwidth=rate, plain_read_bandwidth=plain,
                           offloaded_bytes=report.offloaded_bytes, pool_bytes=report.pool_bytes,
                           resident_bytes=report.resident_bytes, host_budget=budget)  # fmt: skip

    def host_tier(self, name, model, ids, base) -> None:
        """weightlift's host tier on a CPU target: masters stay in RAM, layers are copied into pool slots."""
        torch.set_num_threads(max(1, self.threads - 1))
        try:
            with weightlift.offload(model, device="cpu", config=weightlift.OffloadConfig(prefetch_step=2)) as handle:
                result = measure_decode(model, ids, self.tokens)
                report = handle.report()
        finally:
            torch.set_num_threads(self.threads)
        assert torch.equal(result["tokens"], base["tokens"]), f"{name}: host tier changed the tokens"
        step_time, base_step = 1 / result["decode_tokens_per_s"], 1 / base["decode_tokens_per_s"]
        copy_only = report.copy_seconds / self.tokens
        self.record(name, "weightlift host tier (RAM -> slots), step 2, a core left to the copier", result,
                    baseline="resident, same run", slowdown=step_time / base_step,
                    overlap_efficiency=max(base_step, copy_only) / step_time)  # fmt: skip

    def peer(self, name, make, ids, base, scenario, evict_folder: Path) -> None:
        try:
            model = make()
            evict(evict_folder)
            result = measure_decode(model, ids, self.tokens)
        except Exception as err:  # a peer that cannot run this model is reported, not fatal
            self.record(name, scenario, {}, error=f"{type(err).__name__}: {str(err).splitlines()[0]}"[:300])
            return
        self.record(name, scenario, result, baseline="resident, same run",
                    slowdown=base["decode_tokens_per_s"] / result["decode_tokens_per_s"],
                    same_tokens=bool(torch.equal(result["tokens"], base["tokens"])))  # fmt: skip

    def all_scenarios(self, name, build, ids, *, quick: bool, budget_fraction=None) -> None:
        model = build()
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        budget = int(size * budget_fraction) if budget_fraction else None
        self.budget = budget
        base = self.resident(name, model, ids)
        self.weightlift(name, model, ids, base, "weightlift disk (mapped), step 2", budget=budget)
        if quick:
            return
        self.host_tier(name, model, ids, base)
        spare = max(1, self.threads - 1)
        self.weightlift(name, model, ids, base, "weightlift disk (read into slots), step 2, a core left to the reader",
                        threads=spare, budget=budget, mmap=False)  # fmt: skip
        self.weightlift(name, model, ids, base, "weightlift disk (read into slots), prefetch off", step=0,
                        budget=budget, mmap=False)  # fmt: skip
        self.weightlift(name, model, ids, base, "cold: weightlift disk (mapped), step 2", cold=True)
        self.weightlift(name, model, ids, base, "cold: weightlift disk (read into slots), step 2, a core left",
                        threads=spare, cold=True, mmap=False)  # fmt: skip
        self.weightlift(name, model, ids, base, "cold: weightlift disk (read into slots), prefetch off", step=0,
                        cold=True, mmap=False)  # fmt: skip
        del model

        def accelerate_disk():
            from accelerate import disk_offload

            peer = build()
            disk_offload(peer, str(self.work / f"accelerate-{name.split()[0]}"), execution_device=torch.device("cpu"))
            return peer

        def diffusers_group():
            from diffusers.hooks import apply_group_offloading

            peer = build()
            apply_group_offloading(peer, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1,
                                   offload_to_disk_path=str(self.work / f"diffusers-{name.split()[0]}"))  # fmt: skip
            return peer

        def accelerate_cpu():
            from accelerate import cpu_offload

            peer = build()
            cpu_offload(peer, execution_device=torch.device("cpu"))
            return peer

        self.peer(name, accelerate_cpu, ids, base, "accelerate cpu_offload (RAM, no prefetch)", self.work)
        self.peer(
            name, accelerate_disk, ids, base, "accelerate disk_offload", self.work / f"accelerate-{name.split()[0]}"
        )
        self.peer(name, diffusers_group, ids, base, "diffusers group offloading (block, disk)",
                  self.work / f"diffusers-{name.split()[0]}")  # fmt: skip

    def table(self, name: str, build, ids) -> None:
        """Each CPU configuration warm (the page cache holds the files: the second generate of one setup) and
        from a cold start (the page cache emptied after setup, before the one generate; ``cold rest``: the
        decode tokens after the first), against resident measured before and after them, in this run."""
        from weightlift.convert import convert_gguf
        from weightlift.hf import load_streaming

        model = build()
        measure_decode(model, ids, self.tokens)  # warm-up
        base = measure_decode(model, ids, self.tokens)
        self.record(name, "resident (before)", base, baseline="itself")
        folder = self.work / "table-cache"
        saved = convert_gguf(smollm2_file(), cache_dir=self.work / "table-safetensors")  # a hub-like folder

        def ours(threads=None, **kw):
            def setup():
                handle = weightlift.offload(model, device="cpu", config=weightlift.OffloadConfig(
                    source="disk", disk_path=str(folder), prefetch_step=2, **kw))  # fmt: skip
                torch.set_num_threads(threads or self.threads)

                def close():
                    handle.remove()
                    torch.set_num_threads(self.threads)

                return model, close, folder

            return setup

        def streaming():
            streamed, handle = load_streaming(saved, config=weightlift.OffloadConfig())  # every layer
            return streamed, handle.remove, saved

        def diffusers(per_group):
            def setup():
                from diffusers.hooks import apply_group_offloading

                peer = build()
                peer.lm_head.weight = torch.nn.Parameter(peer.lm_head.weight.detach().clone())  # untied by hand
                where = self.work / f"diffusers-{per_group}"
                apply_group_offloading(peer, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=per_group,
                                       offload_to_disk_path=str(where))  # fmt: skip
                return peer, lambda: None, where

            return setup

        def accelerate_disk():
            from accelerate import disk_offload

            peer, where = build(), self.work / "accelerate"
            disk_offload(peer, str(where), execution_device=torch.device("cpu"))
            return peer, lambda: None, where

        layers = len(model.model.layers)
        rows = [("weightlift disk tier, mapped (mmap=True, the CPU default)", ours()),
                ("weightlift disk tier, read into slots (mmap=False)", ours(mmap=False)),
                ("weightlift disk tier, read into slots, a core left to the reader", ours(self.threads - 1 or 1,
                                                                                          mmap=False)),
                ("weightlift load_streaming (checkpoint tier, mapped)", streaming),
                ("diffusers group offloading, per block (lm_head untied by hand)", diffusers(1)),
                (f"diffusers group offloading, one group of {layers} blocks", diffusers(layers)),
                ("accelerate disk_offload", accelerate_disk)]  # fmt: skip
        measured = []
        for label, setup in rows:
            try:
                runs = {}
                for kind in ("warm", "cold"):
                    target, close, files = setup()
                    try:
                        if kind == "warm":
                            measure_decode(target, ids, 3)  # the page cache and the mapping filled
                        else:
                            evict(files)
                        runs[kind] = measure_decode(target, ids, self.tokens)
                    finally:
                        close()
            except Exception as err:  # a peer that cannot run this model is reported, not fatal
                self.record(name, label, {}, error=f"{type(err).__name__}: {str(err).splitlines()[0]}"[:300])
                continue
            measured.append((label, runs))
        after = measure_decode(model, ids, self.tokens)
        self.record(name, "resident (after)", after, baseline="itself")
        resident = (base["decode_tokens_per_s"] + after["decode_tokens_per_s"]) / 2
        for label, runs in measured:
            warm, cold = runs["warm"], runs["cold"]
            self.record(name, label, warm, baseline="resident before and after, same run",
                        warm_vs_resident=warm["decode_tokens_per_s"] / resident,
                        cold_decode_tokens_per_s=cold["decode_tokens_per_s"],
                        cold_rest_tokens_per_s=cold["decode_rest_tokens_per_s"],
                        cold_rest_vs_warm=cold["decode_rest_tokens_per_s"] / warm["decode_tokens_per_s"],
                        same_tokens=all(torch.equal(r["tokens"], base["tokens"]) for r in runs.values()))  # fmt: skip

    def table_summary(self, name: str) -> str:
        rows = [r for r in self.rows if r["model"] == name]
        lines = [f"{name}, {self.machine['machine']}, torch {self.machine['torch']}, {self.threads} threads, "
                 f"{self.tokens} tokens, decode tokens/s:", "",
                 "| configuration | warm | warm / resident | cold | cold after the first token | same tokens |",
                 "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['scenario']} | could not run: {r['error'][:80]} | | | | |")
            elif r["scenario"].startswith("resident"):
                lines.append(f"| {r['scenario']} | {r['decode_tokens_per_s']:.1f} | | | | reference |")
            else:
                lines.append(f"| {r['scenario']} | {r['decode_tokens_per_s']:.1f} | {r['warm_vs_resident']:.2f}x | "
                             f"{r['cold_decode_tokens_per_s']:.1f} | {r['cold_rest_tokens_per_s']:.1f} "
                             f"({r['cold_rest_vs_warm']:.2f}x warm) | {'yes' if r['same_tokens'] else 'NO'} |")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        lines = [f"Machine: {self.machine['machine']}, torch {self.machine['torch']}, {self.tokens} tokens per run.",
                 "", "| model | scenario | threads | prefill s | decode tok/s | slowdown | overlap eff. | link util. |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip

        def fmt(r, key, pattern):
            return pattern.format(r[key]) if r.get(key) is not None else "-"

        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['scenario']} | - | could not run: {r['error'][:80]} | | | | |")
                continue
            cells = [fmt(r, "prefill_s", "{:.3f}"), fmt(r, "decode_tokens_per_s", "{:.1f}"),
                     fmt(r, "slowdown", "{:.2f}x"), fmt(r, "overlap_efficiency", "{:.2f}"),
                     fmt(r, "link_utilisation", "{:.2f}")]  # fmt: skip
            lines.append(f"| {r['model']} | {r['scenario']} | {r['threads']} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def random_llama(layers: int, quant: str | None):
    def build():
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
                             num_attention_heads=12, num_key_value_heads=12)  # fmt: skip
        model = tf.LlamaForCausalLM(cfg).eval()
        if quant == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(model.model.layers, Int8WeightOnlyConfig())
        elif quant == "nf4":
            import bitsandbytes as bnb

            for layer in model.model.layers:
                for parent in list(layer.modules()):
                    for attr, lin in list(parent.named_children()):
                        if type(lin) is torch.nn.Linear:
                            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                                    compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
                            new.weight = bnb.nn.Params4bit(lin.weight.detach(), requires_grad=False, quant_type="nf4")
                            setattr(parent, attr, new.to("cpu"))
        return model

    return build


def _append(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "bench.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="weightlift benchmarks (CPU)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="only the main rows")
    parser.add_argument("--smollm2", action="store_true", help="only the SmolLM2 table")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="weightlift-bench-"))
    try:
        run(args, Bench(args.tokens, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # every cache and copy this run wrote


def run(args, bench: Bench) -> None:
    smollm2, tokenizer = load_gguf(smollm2_file())
    ids = chat_ids(tokenizer, PROMPT)
    first = [smollm2]  # the loaded model serves the weightlift rows; each peer loads its own

    def smollm2_model():
        return first.pop() if first else load_gguf(smollm2_file())[0]

    table = "SmolLM2-135M fp32, every layer offloaded"
    bench.table(table, smollm2_model, ids)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "smollm2.md").write_text(bench.table_summary(table))
    print("\n" + bench.table_summary(table))
    if args.smollm2:
        _append(bench.rows)
        return
    bench.all_scenarios("SmolLM2-135M fp32", smollm2_model, ids, quick=args.quick)
    random_ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(0))
    for quant in (None, "int8", "nf4"):
        name = f"random Llama 24x768 {quant or 'fp32'}"
        bench.all_scenarios(name, random_llama(24, quant), random_ids, quick=args.quick, budget_fraction=0.25)
    _append(bench.rows)
    (RESULTS / "summary.md").write_text(bench.summary())
    print("\n" + bench.summary())


if __name__ == "__main__":
    main()
