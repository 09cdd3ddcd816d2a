"""Eager vs torch.compile (inductor), resident vs offloaded, side by side in one run.

The step is one forward of a single token without KV cache (the weight-bound part of a decode step,
with a fixed shape so that each compiled model compiles once). Every row of a model is measured in the
same process against ``eager resident`` of that model. Models: the embedded SmolLM2
(every layer offloaded, prefetch_step=2) and, with ``--tiny``, the 5-layer test Llama.

Writes JSON lines to ``benchmarks/results/compile.jsonl``.
Usage: ``.venv/bin/python benchmarks/compile_bench.py [--steps 50] [--tiny]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import weightlift
from weightlift import OffloadConfig

RESULTS = Path(__file__).parent / "results"


def _time(step, ids: torch.Tensor, steps: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            step(ids)
        start = time.perf_counter()
        for _ in range(steps):
            step(ids)
    return (time.perf_counter() - start) / steps


def _compiled(model):
    counters.clear()
    compiled = torch.compile(model)
    start = time.perf_counter()
    with torch.inference_mode():
        first = compiled(torch.zeros(1, 1, dtype=torch.long)).logits
    return compiled, time.perf_counter() - start, sum(counters["graph_break"].values()), first


def bench(name: str, model, steps: int) -> list[dict]:
    """Resident rows, then the offloaded rows on a deep copy, each phase compiled after a dynamo reset
    (dynamo does not guard on module hooks, so a graph compiled without them must not be reused)."""
    ids = torch.tensor([[42]])
    times: dict[str, float] = {}
    torch._dynamo.reset()
    resident_compiled, resident_compile_s, resident_breaks, resident_out = _compiled(model)
    times["eager resident"] = _time(model, ids, steps)
    times["compiled resident"] = _time(resident_compiled, ids, steps)
    offloaded = copy.deepcopy(model)
    handle = weightlift.offload(offloaded, device="cpu", config=OffloadConfig(prefetch_step=2))
    torch._dynamo.reset()
    offloaded_compiled, offloaded_compile_s, offloaded_breaks, offloaded_out = _compiled(offloaded)
    times["eager offloaded"] = _time(offloaded, ids, steps)
    times["compiled offloaded"] = _time(offloaded_compiled, ids, steps)
    report = handle.report()
    handle.remove()
    base = min(times["eager resident"], _time(model, ids, steps))  # again at the end: drift check
    rows = []
    for run, best in times.items():
        rows.append({
            "model": name, "run": run, "step_ms": round(best * 1e3, 3), "steps_per_s": round(1 / best, 1),
            "vs_eager_resident": round(base / best, 3), "baseline": "eager resident",
            "graph_breaks": {"compiled resident": resident_breaks, "compiled offloaded": offloaded_breaks}.get(run),
            "compile_s": {"compiled resident": round(resident_compile_s, 1),
                          "compiled offloaded": round(offloaded_compile_s, 1)}.get(run),
            "bitwise_compiled_offloaded_vs_resident": torch.equal(offloaded_out, resident_out),
            "prefetch_misses": report.prefetch_misses,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        })  # fmt: skip
    torch._dynamo.reset()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="also the 5-layer test Llama")
    args = parser.parse_args()
    from weightlift.hf import load_gguf, smollm2_file

    models = [("SmolLM2-135M", load_gguf(smollm2_file())[0])]
    if args.tiny:
        import transformers as tf

        torch.manual_seed(0)
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        models.append(("tiny-llama-5", tf.LlamaForCausalLM(cfg).eval()))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "compile.jsonl", "a") as f:
        for name, model in models:
            for row in bench(name, model, args.steps):
                print(json.dumps(row))
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
