"""The planner checked against measurement, side by side in one run (`make bench-plan`).

For each model (SmolLM2, the embedded model, and two small random-weight models built from configs)
and each budget from "everything fits" down to the minimum, on this machine's target device:

1. ``weightlift.plan`` measures and chooses; its predicted seconds per forward (prefill of 32 tokens,
   and a decode step with the prefill's KV cache) are compared with the same forwards measured with
   the plan applied (``error`` = measured / predicted - 1);
2. the plan's decode is compared with two naive configurations that fit the same budget, measured in
   the same run: every layer offloaded with prefetch step 1, and vLLM-style group offloading (the
   ``i % G >= G - N`` rule with the fewest offloaded layers that fits, step 1); the plan is measured
   again after them, and the difference between its two measurements is the run's noise.

Every time is the lower of two medians of 9 runs taken in interleaved rounds (``time_forwards``), the
way the planner measures, so that a burst of other work on a shared machine during one round does not
count. Every row records the device memory for weights the report gives, against the budget. Writes JSON lines
to ``benchmarks/results/plan.jsonl`` and a Markdown table to ``benchmarks/results/plan.md``.
Usage: ``.venv/bin/python benchmarks/plan_bench.py [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import weightlift
from weightlift import OffloadConfig
from weightlift.measure import analyse, language_model_workloads, time_forwards

RESULTS = Path(__file__).parent / "results"


def small_models():
    import transformers as tf

    torch.manual_seed(0)
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()  # fmt: skip
    torch.manual_seed(0)
    qwen3 = tf.Qwen3ForCausalLM(tf.Qwen3Config(
        vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()  # fmt: skip
    return {"llama-12x512 (random)": llama, "qwen3-8x384 (random)": qwen3}


def vllm_style(n: int, fits) -> OffloadConfig | None:
    """The vLLM group rule with the fewest offloaded layers whose memory fits."""
    best = None
    for group in range(1, n + 1):
        for num in range(1, group + 1):
            config = OffloadConfig(group_size=group, num_in_group=num, prefetch_step=1)
            chosen = [i for i in range(n) if config.offloads_layer(i)]
            if fits(chosen) and (best is None or len(chosen) < best[0]):
                best = (len(chosen), config)
    return best[1] if best else None


def measure(model, device, runners, **how) -> dict:
    with weightlift.offload(model, device=device, **how) as handle:
        os.sync()  # the cache just written is flushed now, not by writeback during the timing
        times = time_forwards(runners, device)
        report = handle.report()
    return {"prefill_s": times["prefill"], "decode_s": times["decode"], "device_bytes": report.device_bytes,
            "layers_offloaded": report.layers_offloaded, "prefetch_misses": report.prefetch_misses}  # fmt: skip


def bench_model(name: str, model, device, work: Path, quick: bool, out) -> list[dict]:
    info = analyse(model)
    total, minimum = info.total_bytes, info.minimum_bytes
    fractions = [1.0, 0.5, 0.0] if quick else [1.0, 0.75, 0.5, 0.25, 0.0]
    runners = language_model_workloads(model, device)
    resident = time_forwards(runners, device) if device.type == "cpu" else {}
    rows = []
    for fraction in fractions:
        budget = int(minimum + fraction * (total - minimum))
        folder = work / "cache"
        os.sync()  # no writeback of earlier caches during the planner's timing
        plan = weightlift.plan(model, device=device, budget=budget, disk_path=folder)
        planned = measure(model, device, runners, plan=plan)
        source = {"source": "disk", "disk_path": str(folder)} if device.type == "cpu" else {}

        def fits(chosen, plan=plan, budget=budget):
            slot = max((plan.layer_bytes[i] for i in chosen), default=0)
            return total - sum(info.data_bytes[i] for i in chosen) + slot <= budget

        naive = {}
        if len(plan.offloaded):
            naive["all, step 1"] = OffloadConfig(prefetch_step=1, **source)
            vllm = vllm_style(len(info.names), fits)
            if vllm is not None:
                naive[f"vLLM G={vllm.group_size} N={vllm.num_in_group}, step 1"] = OffloadConfig(
                    group_size=vllm.group_size, num_in_group=vllm.num_in_group, prefetch_step=1, **source)
        naive_rows = {label: measure(model, device, runners, config=config) for label, config in naive.items()}
        again = measure(model, device, runners, plan=plan) if naive_rows else planned  # run-to-run noise
        noise = abs(again["decode_s"] - planned["decode_s"]) / min(again["decode_s"], planned["decode_s"])
        row = {
            "model": name, "device": str(device), "budget": budget, "budget_fraction": fraction,
            "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "layers": len(info.names), "offloaded": len(plan.offloaded),
            "prefetch_step": plan.prefetch_step, "bound": plan.bound, "link": plan.link,
            "plan_device_bytes": plan.device_bytes, "measured_device_bytes": planned["device_bytes"],
            "within_budget": planned["device_bytes"] <= budget,
            "resident": resident,
            **{f"{w}_predicted_s": plan.workloads[w].predicted_s for w in ("prefill", "decode")},
            **{f"{w}_measured_s": planned[f"{w}_s"] for w in ("prefill", "decode")},
            **{f"{w}_error": planned[f"{w}_s"] / plan.workloads[w].predicted_s - 1 for w in ("prefill", "decode")},
            "naive": naive_rows,
            "decode_measured_again_s": again["decode_s"], "decode_noise": noise,
            "plan_vs_best_naive_decode": (min(planned["decode_s"], again["decode_s"])
                                          / min(r["decode_s"] for r in naive_rows.values()) if naive_rows else None),
        }  # fmt: skip
        rows.append(row)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"{name} budget {budget / 2**20:.1f} MiB: {row['offloaded']}/{row['layers']} offloaded step "
              f"{row['prefetch_step']}; prefill {row['prefill_predicted_s'] * 1e3:.1f} vs "
              f"{row['prefill_measured_s'] * 1e3:.1f} ms ({row['prefill_error']:+.0%}), decode "
              f"{row['decode_predicted_s'] * 1e3:.1f} vs {row['decode_measured_s'] * 1e3:.1f} ms "
              f"({row['decode_error']:+.0%}); naive decode "
              + ", ".join(f"{k}: {v['decode_s'] * 1e3:.1f} ms" for k, v in naive_rows.items()), file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | budget MiB | offloaded | step | weights MiB (report) | prefill pred/meas ms | err | "
        "decode pred/meas ms | err | resident decode ms | plan decode again ms | "
        "naive decode ms (all step 1; vLLM-style) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        naive = "; ".join(f"{v['decode_s'] * 1e3:.1f}" for v in r["naive"].values()) or "-"
        lines.append(
            f"| {r['model']} | {r['budget'] / 2**20:.1f} | {r['offloaded']}/{r['layers']} | {r['prefetch_step']} | "
            f"{r['measured_device_bytes'] / 2**20:.1f} | {r['prefill_predicted_s'] * 1e3:.1f} / "
            f"{r['prefill_measured_s'] * 1e3:.1f} | {r['prefill_error']:+.0%} | {r['decode_predicted_s'] * 1e3:.1f} / "
            f"{r['decode_measured_s'] * 1e3:.1f} | {r['decode_error']:+.0%} | "
            f"{r['resident'].get('decode', float('nan')) * 1e3:.1f} | {r['decode_measured_again_s'] * 1e3:.1f} | "
            f"{naive} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="three budgets per model instead of five")
    parser.add_argument("--device", default=None)
    parser.add_argument("--only", default=None, help="run only models whose name contains this")
    args = parser.parse_args()
    from weightlift.config import resolve_device
    from weightlift.hf import load_gguf, smollm2_file

    device = resolve_device(args.device)
    RESULTS.mkdir(exist_ok=True)
    models = {"SmolLM2-135M (fp32)": lambda: load_gguf(smollm2_file())[0]}
    models.update({k: (lambda m=m: m) for k, m in small_models().items()})
    rows = []
    with open(RESULTS / "plan.jsonl", "w") as out, tempfile.TemporaryDirectory(dir=RESULTS) as work:
        for name, load in models.items():
            if args.only and args.only not in name:
                continue
            rows += bench_model(name, load(), device, Path(work), args.quick, out)
    (RESULTS / "plan.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
