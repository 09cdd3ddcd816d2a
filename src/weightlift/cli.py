"""`weightlift ...` / `python -m weightlift ...`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from .config import OffloadConfig, format_size
from .errors import OffloadError

DEMO_PROMPT = "Explain in two sentences why the sky is blue."
EPILOG = """examples:
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
    source = args.source or ("disk" if device.type == "cpu" else "host")
    path = smollm2_file()
    model, tokenizer = load_gguf(path)
    ids = chat_ids(tokenizer, args.prompt)
    disk = {"source": "disk", "disk_path": args.cache_dir} if source == "disk" else {}
    config = OffloadConfig(group_size=5, num_in_group=4, prefetch_step=2, **disk)
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


def default_cache_dir() -> str:
    return os.environ.get("WEIGHTLIFT_CACHE") or str(Path.home() / ".cache" / "weightlift")


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
    demo.add_argument("--device", default=None, help="target device (default: the accelerator if any, else cpu)")
    demo.add_argument(
        "--source",
        choices=["disk", "host"],
        default=None,
        help="where offloaded weights live (default: disk on a CPU target, host RAM otherwise)",
    )
    demo.add_argument(
        "--cache-dir",
        default=default_cache_dir(),
        help="folder of the disk tier's layer cache (default: $WEIGHTLIFT_CACHE or ~/.cache/weightlift)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=_demo)
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
