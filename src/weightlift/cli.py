"""`weightlift ...` / `python -m weightlift ...`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import torch

from .config import OffloadConfig, format_size
from .errors import OffloadError
from .plan import default_cache_dir

DEMO_PROMPT = "Explain in two sentences why the sky is blue."
EPILOG = """examples:
  weightlift bench smollm2 --plot t.png  resident vs offloaded prefill/decode, a timeline and a bar chart
  weightlift demo                      SmolLM2 resident, then with 24 of 30 layers streamed from a disk
                                       cache (written on the first run); same answer
  weightlift demo --source host        stream from host RAM instead
  weightlift demo --json               the same, as one JSON object
"""


def _demo(args: argparse.Namespace) -> int:
    from . import offload
    from .apply import resolve_device
    from .hf import chat_ids, greedy, load_gguf, smollm2_file

    device = resolve_device(args.device)
    config = _offload_config(args, device)
    source = config.source
    path = smollm2_file()
    model, tokenizer = load_gguf(path)
    ids = chat_ids(tokenizer, args.prompt)
    resident, t_resident = greedy(model, ids, args.tokens)
    with offload(model, device=device, config=config) as handle:
        streamed, t_streamed = greedy(model, ids, args.tokens)
        report = handle.report()
    same = torch.equal(resident, streamed)
    result = {
        "model": path.name,
        "device": report.device,
        "prompt": args.prompt,
        "new_tokens": args.tokens,
        "resident": {"answer": tokenizer.decode(resident), "tokens_per_s": args.tokens / t_resident},
        "offloaded": {"answer": tokenizer.decode(streamed), "tokens_per_s": args.tokens / t_streamed},
        "identical": same,
        "report": report.to_dict(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model: {path.name} ({report.layers} layers), device: {report.device}, source: {source}")
        print(f"prompt: {args.prompt}\n")
        for key in ("resident", "offloaded"):
            print(f"[{key}] {result[key]['tokens_per_s']:.1f} tokens/s\n{result[key]['answer'].strip()}\n")
        print(f"identical answers: {'yes' if same else 'NO'}\n")
        print(report)
        where = "RAM" if report.device == "cpu" else f"{report.device} memory"
        held = report.device_bytes + (report.offloaded_bytes if source == "host" and report.device == "cpu" else 0)
        print(
            f"\n{where} held by weights: resident run {format_size(report.resident_bytes + report.offloaded_bytes)}, "
            f"offloaded run {format_size(held)}"
            + (" (on a CPU target with source=host the masters stay in RAM)" if source == "host" else "")
        )
    return 0 if same else 1


def _offload_config(args: argparse.Namespace, device) -> OffloadConfig:
    source = args.source or ("disk" if device.type == "cpu" else "host")
    disk = {"source": source, "disk_path": args.cache_dir} if source != "host" else {}
    return OffloadConfig(group_size=args.group_size, num_in_group=args.num_in_group,
                         prefetch_step=args.prefetch_step, **disk)  # fmt: skip


def _bench(args: argparse.Namespace) -> int:
    from . import offload
    from .apply import resolve_device
    from .hf import chat_ids, load_model, measure_decode

    device = resolve_device(args.device)
    config = _offload_config(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = chat_ids(tokenizer, DEMO_PROMPT) if tokenizer is not None else torch.arange(3, 35)[None]
    model.to(device)
    resident = measure_decode(model, ids.to(device), args.tokens)
    model.to("cpu")
    with offload(model, device=device, config=config) as handle:
        handle.timeline.events.clear()
        copied_before = handle.report().copy_seconds  # the copies primed at setup are not part of the run
        offloaded = measure_decode(model, ids.to(device), args.tokens)
        report = handle.report()
        if args.trace:
            handle.trace(args.trace)
        events = list(handle.timeline.events)
    same = torch.equal(resident["tokens"].cpu(), offloaded["tokens"].cpu())
    forwards = args.tokens  # prefill + tokens - 1 decode steps
    step_resident, step_offloaded = 1 / resident["decode_tokens_per_s"], 1 / offloaded["decode_tokens_per_s"]
    copy_per_forward = (report.copy_seconds - copied_before) / max(forwards, 1)
    result = {
        "model": args.model, "device": str(device), "config": dataclasses.asdict(config),
        "tokens": args.tokens, "threads": torch.get_num_threads(), "identical": same,
        "resident": {k: v for k, v in resident.items() if k != "tokens"},
        "offloaded": {k: v for k, v in offloaded.items() if k != "tokens"},
        "slowdown": step_offloaded / step_resident,
        "copy_seconds_per_forward": copy_per_forward,
        "overlap_efficiency": max(step_resident, copy_per_forward) / step_offloaded,
        "report": report.to_dict(),
    }  # fmt: skip
    if args.plot:
        from .report import plot_timeline

        plot_timeline(events, {"resident": step_resident, "offloaded": step_offloaded}, args.plot)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"model: {args.model}, device: {device}, {args.tokens} tokens, {result['threads']} threads")
        print(f"{'':10}{'prefill s':>11}{'decode tok/s':>14}")
        for key in ("resident", "offloaded"):
            print(f"{key:10}{result[key]['prefill_s']:>11.3f}{result[key]['decode_tokens_per_s']:>14.1f}")
        print(f"slowdown {result['slowdown']:.2f}x, overlap efficiency {result['overlap_efficiency']:.2f} "
              f"(max of the resident step and the copy time per forward, over the offloaded step)")  # fmt: skip
        print(f"identical tokens: {'yes' if same else 'NO'}\n")
        print(report)
    return 0 if same else 1


def _add_place_args(parser: argparse.ArgumentParser, sources: list[str], folder: str) -> None:
    """Where the model runs and where its offloaded weights live."""
    parser.add_argument("--device", default=None, help="target device (default: the accelerator if any, else cpu)")
    parser.add_argument(
        "--source",
        choices=sources,
        default=None,
        help="where offloaded weights live (default: disk on a CPU target, host RAM otherwise)",
    )
    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help=f"{folder} (default: $WEIGHTLIFT_CACHE or ~/.cache/weightlift)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightlift",
        description="Run PyTorch models bigger than your accelerator by streaming weights layer-ahead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what weightlift does")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the embedded SmolLM2 model resident and offloaded, compare answers")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--tokens", type=int, default=32, help="new tokens to generate (default 32)")
    _add_place_args(demo, ["disk", "host"], "folder of the disk tier's layer cache")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=_demo, group_size=5, num_in_group=4, prefetch_step=2)
    bench = sub.add_parser(
        "bench", help="measure resident vs offloaded prefill and decode on a model",
        description="Measure prefill and decode resident, then offloaded, in one process; same tokens required.",
    )  # fmt: skip
    bench.add_argument("model", help="'smollm2', a .gguf file, or a transformers model folder")
    bench.add_argument("--group-size", type=int, default=1)
    bench.add_argument("--num-in-group", type=int, default=1)
    bench.add_argument("--prefetch-step", type=int, default=2)
    bench.add_argument("--tokens", type=int, default=16, help="new tokens (default 16)")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    bench.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace of the offloaded run")
    bench.add_argument("--plot", default=None, help="draw the timeline and time per token to this PNG")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    _add_place_args(bench, ["disk", "host", "checkpoint"], "folder of the layer cache, or of the checkpoint")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    for noisy in ("torchao", "torch.utils._pytree"):  # torchao's CUDA-only kernels, and its pytree notices
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.run(args)
    except OffloadError as err:
        print(f"weightlift: error: {err}", file=sys.stderr)
        return 2
