"""`weightlift ...` / `python -m weightlift ...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from . import cli_models as models
from . import cli_run as commands
from .cli_checks import check_args, check_budgets, cli_words
from .config import format_size
from .errors import OffloadError
from .plan import default_cache_dir

log = logging.getLogger(__name__)

EPILOG = """examples:
  weightlift inspect smollm2 --budget 300MiB   layers, bytes, formats, and what fits in 300 MiB
  weightlift plan smollm2 --budget 300MiB --out plan.json
                                       measure this machine, choose what to offload, save the plan
  weightlift generate smollm2 --budget 300MiB --prompt "Why is the sky blue?"
                                       chat with the model within 300 MiB of weights, streamed
  weightlift bench smollm2 --budget 300MiB     predicted vs measured time per forward
  weightlift bench smollm2 --plot t.png  resident vs offloaded prefill/decode, a timeline and a bar chart
  weightlift demo                      SmolLM2 resident, then with 24 of 30 layers streamed from a disk
                                       cache (written on the first run); same answer
  weightlift demo --source host        stream from host RAM instead
  weightlift demo --json               the same, as one JSON object
"""

EXAMPLES = {
    "demo": """examples:
  weightlift demo                      SmolLM2 resident, then streamed from a disk cache; same answer
  weightlift demo --source host --tokens 16
  weightlift demo --json               one JSON object: both answers, tokens/s, the report
""",
    "bench": """examples:
  weightlift bench smollm2             resident, then every layer offloaded (step 2); same tokens required
  weightlift bench ./my-model --group-size 4 --num-in-group 3 --source disk --plot t.png --trace t.json
  weightlift bench smollm2 --budget 300MiB --json
                                       plan for 300 MiB, then predicted vs measured ms per forward
""",
    "inspect": """examples:
  weightlift inspect smollm2           layers, bytes per layer, formats
  weightlift inspect ./my-model --budget 4GiB --json
""",
    "plan": """examples:
  weightlift plan smollm2 --budget 300MiB
  weightlift plan ./my-model --budget 6GiB --host-budget 16GiB --out plan.json
  weightlift generate ./my-model --plan plan.json --prompt "Hi"   (apply it later)
""",
    "generate": """examples:
  weightlift generate smollm2 --prompt "Why is the sky blue?"              everything resident
  weightlift generate smollm2 --budget 300MiB --prompt "Hi" --tokens 32    layers streamed to fit 300 MiB
  weightlift generate ./my-model --plan plan.json --prompt "Hi" --temperature 0.7 --top-p 0.9 --seed 1
  weightlift generate smollm2 --prompt "Hi" --json     text, tokens/s, time to first token, peak RSS
""",
}

def _add_place_args(parser: argparse.ArgumentParser, sources: list[str] | None, folder: str) -> None:
    """Where the model runs and where its offloaded weights live (no ``--source`` where a plan chooses it)."""
    parser.add_argument("--device", default=None, help="target device (default: the accelerator if any, else cpu)")
    if sources:
        parser.add_argument(
            "--source",
            choices=sources,
            default=None,
            help="where offloaded weights live (default: disk on a CPU target, host RAM otherwise)",
        )
    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help=f"{folder} (default: $WEIGHTLIFT_CACHE or ~/.cache/weightlift)")  # fmt: skip


def _layer_formats(layer) -> list[str]:
    from .tensors import take_apart

    found = []
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        try:
            kind = take_apart(name, t, ()).kind
        except OffloadError:
            kind = f"unsupported {type(t).__name__}"
        label = str(t.dtype).removeprefix("torch.") if kind == "plain" else kind
        if label not in found:
            found.append(label)
    return found


def _experts_of(layer, nbytes: int, top_k: int | None) -> dict | None:
    """A MoE layer's dense and expert bytes, and what a decode token reads of it (top-k experts per stack)."""
    from .experts import expert_bytes, find_experts

    stacks = find_experts(layer)
    if not stacks:
        return None
    per = [expert_bytes(layer, s) for s in stacks]
    dense = nbytes - sum(p * s.count for p, s in zip(per, stacks))
    return {"stacks": [s.path for s in stacks], "count": sum(s.count for s in stacks), "bytes_per_expert": max(per),
            "dense_bytes": dense, "top_k": top_k,
            "routed_bytes_per_token": dense + top_k * sum(per) if top_k else None}  # fmt: skip


def _inspect(args: argparse.Namespace) -> int:
    from .hf import skeleton
    from .measure import analyse

    check_budgets(args)
    model = skeleton(models.folder_of(args), models.dtype_of(args))  # no weights: sizes and formats from the shapes
    info = analyse(model)
    total, minimum = info.total_bytes, info.minimum_bytes
    largest = max(info.nbytes, default=0)
    layers = [{"name": n, "bytes": b, "formats": _layer_formats(m)} for n, b, m in zip(info.names, info.data_bytes,
                                                                                      info.layers)]  # fmt: skip
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    for layer, module in zip(layers, info.layers):
        found = _experts_of(module, layer["bytes"], top_k)
        if found is not None:
            layer["experts"] = found
    result = {"model": args.model, "class": type(model).__name__, "stacks": info.stacks, "layers": layers,
              "total_bytes": total, "outside_layers_bytes": info.other_bytes, "largest_layer_slot_bytes": largest,
              "minimum_budget_bytes": minimum}  # fmt: skip
    if args.budget is not None:
        from .config import parse_size

        budget = parse_size(args.budget, name="budget")
        fits = total <= budget
        room = budget - minimum
        resident_layers = 0
        for b in sorted(info.data_bytes):
            if room < b:
                break
            room -= b
            resident_layers += 1
        result["budget"] = {"bytes": budget, "everything_fits": fits, "possible": budget >= minimum,
                            "resident_layers_at_most": len(layers) if fits else resident_layers}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {type(model).__name__}, {len(layers)} layers in {', '.join(info.stacks)}")
    print(f"weights {format_size(total)}: {format_size(info.other_bytes)} outside the layers, "
          f"largest layer {format_size(largest)}")  # fmt: skip
    width = max(len(layer["name"]) for layer in layers)
    for layer in layers:
        print(f"  {layer['name'].ljust(width)}  {format_size(layer['bytes']):>11}  {', '.join(layer['formats'])}")
        if "experts" in layer:
            e = layer["experts"]
            per = f", {format_size(e['routed_bytes_per_token'])} per decode token" if e["top_k"] else ""
            print(f"  {''.ljust(width)}  dense {format_size(e['dense_bytes'])} + {e['count']} experts x "
                  f"{format_size(e['bytes_per_expert'])}{per}")  # fmt: skip
    print(f"smallest budget that runs it: {format_size(minimum)} (everything outside the layers + one layer slot)")
    if "budget" in result:
        b = result["budget"]
        if b["everything_fits"]:
            print(f"budget {format_size(b['bytes'])}: everything fits, nothing needs offloading")
        elif not b["possible"]:
            print(f"budget {format_size(b['bytes'])}: too small (needs at least {format_size(minimum)})")
        else:
            print(f"budget {format_size(b['bytes'])}: at most {b['resident_layers_at_most']} of {len(layers)} layers "
                  "stay resident; `weightlift plan` chooses which")  # fmt: skip
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .config import resolve_device
    from .hf import load_outside_layers
    from .plan import plan

    check_budgets(args)
    device = resolve_device(args.device)
    folder = models.folder_of(args, stream=True)
    model, _, _ = load_outside_layers(folder, dtype=models.dtype_of(args),  # the layers stay empty: measured streamed
                                      cpu=device.type == "cpu")  # as `generate` will load it
    with models.phase(f"planning for --budget {args.budget} (measuring this machine and model)"):
        result = plan(model, device=device, budget=args.budget, host_budget=args.host_budget,
                      disk_path=args.cache_dir, checkpoint=folder)  # fmt: skip
    if args.out:
        Path(args.out).write_text(result.to_json())
    print(result.to_json() if args.json else result)
    return 0


def _add_budget_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--budget", required=required, default=None,
                        help="device memory for weights (on a CPU target: RAM), e.g. 4GiB or 300MB")  # fmt: skip
    parser.add_argument("--host-budget", default=None,
                        help="host RAM the plan may allocate (accelerator targets; with --budget)")  # fmt: skip


def _add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="load the weights in this dtype (default: the checkpoint's own for a model folder, "
                             "float32 for GGUF)")  # fmt: skip


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mine = version("weightlift")
    except PackageNotFoundError:
        from . import __version__ as mine
    return f"weightlift {mine} (torch {torch.__version__})"


def _cache(args: argparse.Namespace) -> int:
    """``weightlift cache list`` / ``weightlift cache clear``: what is in the cache folder, and removing it."""
    from . import cache

    folder = Path(args.cache_dir).expanduser()
    if args.cache_command == "list":
        found = cache.entries(folder)
        total = sum(e.size for e in found)
        if args.json:
            print(json.dumps({"cache_dir": str(folder), "entries": [e.to_dict() for e in found],
                              "total_bytes": total}, indent=2))  # fmt: skip
            return 0
        if not found:
            print(f"no weightlift caches in {folder}")
            return 0
        rows = [(str(e.path.relative_to(folder)), e.kind, e.model, e.dtype, format_size(e.size),
                 e.last_used.strftime("%Y-%m-%d %H:%M")) for e in found]  # fmt: skip
        head = ("file", "kind", "model", "dtype", "size", "last use")
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        for row in (head, *rows):
            print("  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        print(f"total: {format_size(total)} in {len(found)} entr{'y' if len(found) == 1 else 'ies'} in {folder}")
        return 0
    if args.older_than is not None and not args.older_than >= 0:
        raise OffloadError(f"`--older-than`={args.older_than} must be a number of days >= 0, e.g. 30")
    removed = cache.clear(folder, model=args.model, older_than_days=args.older_than)
    for e in removed:
        print(f"removed {e.path.relative_to(folder)} ({e.kind}, {e.model}, {format_size(e.size)})")
    which = "".join([f" of models matching {args.model!r}" if args.model else "",
                     f" unused for {args.older_than:g} days" if args.older_than is not None else ""])  # fmt: skip
    if not removed:
        print(f"nothing to remove{which} in {folder}")
    else:
        print(f"freed {format_size(sum(e.size for e in removed))} ({len(removed)} entr"
              f"{'y' if len(removed) == 1 else 'ies'}{which}) in {folder}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightlift",
        description="Run PyTorch models bigger than your accelerator by streaming weights layer-ahead.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version(), help="print the versions and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what weightlift does: one line per phase with its seconds")  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    def command(name: str, help: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kw)  # fmt: skip

    model_help = "'smollm2' (the embedded model), a .gguf file, or a transformers model folder"
    demo = command("demo", "run the embedded SmolLM2 model resident and offloaded, compare answers")
    demo.add_argument("--prompt", default=commands.DEMO_PROMPT,
                      help="the user turn (default: a question about the sky)")  # fmt: skip
    demo.add_argument("--tokens", type=int, default=32, help="new tokens to generate (default 32)")
    _add_place_args(demo, ["disk", "host"], "folder of the disk tier's layer cache")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=commands.demo, group_size=5, num_in_group=4, prefetch_step=2)

    bench = command(
        "bench", "measure resident vs offloaded prefill and decode on a model",
        description="Measure prefill and decode resident, then offloaded, in one process; same tokens required.",
    )  # fmt: skip
    bench.add_argument("model", help=model_help)
    knobs = "offloaded layers: layer i is offloaded when i %% GROUP_SIZE >= GROUP_SIZE - NUM_IN_GROUP"
    bench.add_argument("--group-size", type=int, default=None,
                       help=f"layers per group (default 1); {knobs}")  # fmt: skip
    bench.add_argument("--num-in-group", type=int, default=None,
                       help="offloaded layers per group, the last ones of each group (default 1: every layer)")
    bench.add_argument("--prefetch-step", type=int, default=None,
                       help="copy the weights of the offloaded layer this many offloaded layers ahead "
                            "(default 2; 0: load each when it runs)")  # fmt: skip
    bench.add_argument("--tokens", type=int, default=None, help="new tokens (default 16)")
    bench.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    bench.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace of the offloaded run")
    bench.add_argument("--plot", default=None,
                       help="draw a PNG: the offloaded timeline, and prefill/decode ms resident vs offloaded")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    _add_dtype_arg(bench)
    _add_place_args(bench, ["disk", "host", "checkpoint"], "folder of the layer cache, or of the checkpoint")
    bench.add_argument("--budget", default=None, help="plan for this budget and report predicted vs measured "
                       "time per forward instead of using the knobs above")  # fmt: skip
    bench.add_argument("--host-budget", default=None, help="host RAM the plan may allocate (with --budget)")
    bench.set_defaults(run=commands.bench)

    inspect = command("inspect", "layers, bytes per layer, formats, and what fits in a budget")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--budget", default=None, help="say what fits in this much memory, e.g. 4GiB")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    _add_dtype_arg(inspect)
    inspect.set_defaults(run=_inspect)

    plan = command("plan", "measure this machine and model, choose what to offload for a budget")
    plan.add_argument("model", help=model_help)
    _add_budget_args(plan, required=True)
    plan.add_argument("--out", default=None, help="save the plan as JSON (for generate --plan)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_dtype_arg(plan)
    _add_place_args(plan, None, "folder of the layer cache when layers stream from disk")
    plan.set_defaults(run=_plan)

    gen = command("generate", "chat with a model within a memory budget, output streamed")
    gen.add_argument("model", help=model_help)
    gen.add_argument("--prompt", required=True, help="the user turn (chat-formatted with the model's template)")
    gen.add_argument("--tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="nucleus sampling threshold in (0, 1] (with --temperature; default 1)")  # fmt: skip
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    _add_budget_args(gen, required=False)
    gen.add_argument("--plan", default=None, help="apply a plan saved by `weightlift plan --out` (not with --budget)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object instead of streaming (adds time to first token, peak RSS, the plan)")
    _add_dtype_arg(gen)
    _add_place_args(gen, None, "folder of the layer cache when layers stream from disk")
    gen.set_defaults(run=commands.generate)

    cache_dir_help = "the cache folder (default: $WEIGHTLIFT_CACHE or ~/.cache/weightlift)"
    cache_examples = (
        "examples:\n"
        "  weightlift cache list                     what is cached, how big, when last used\n"
        "  weightlift cache list --json              the same, as one JSON object\n"
        "  weightlift cache clear Llama              remove the entries of models whose name contains 'Llama'\n"
        "  weightlift cache clear --older-than 30    remove what was not used in the last 30 days\n"
        "  weightlift cache clear                    remove everything weightlift cached\n"
    )
    raw = argparse.RawDescriptionHelpFormatter
    cache = sub.add_parser(
        "cache", help="list or remove the layer caches and converted models weightlift keeps on disk",
        description="weightlift keeps, in its cache folder, one layer cache file per model and dtype (written the\n"
        "first time a model's layers stream from disk, reused by every plan of that model) and converted models.",
        epilog=cache_examples, formatter_class=raw,
    )  # fmt: skip
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="{list,clear}",
                                     help="list the cache, or clear entries of it")  # fmt: skip
    listing = cache_sub.add_parser(
        "list", help="list the entries (file, kind, model, dtype, size, last use) and their total",
        description="List weightlift's entries in the cache folder: file, kind, model, dtype, size, last use.",
        epilog=cache_examples, formatter_class=raw,
    )  # fmt: skip
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.add_argument("--cache-dir", default=str(default_cache_dir()), metavar="DIR", help=cache_dir_help)
    clearing = cache_sub.add_parser(
        "clear", help="remove entries: all, or those matching MODEL and/or --older-than",
        description="Remove weightlift's entries from the cache folder and say how many bytes that freed. Files\n"
        "that are not weightlift's are never touched. A model whose layer cache is removed gets it written\n"
        "again the next time its layers stream from disk.",
        epilog=cache_examples, formatter_class=raw,
    )  # fmt: skip
    clearing.add_argument("model", nargs="?", default=None, metavar="MODEL",
                          help="only entries whose model name (as `cache list` shows it) contains this text, "
                          "case-insensitive (a substring match), e.g. 'Llama' or 'LlamaForCausalLM'")  # fmt: skip
    clearing.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                          help="only entries last used more than DAYS days ago (fractions allowed)")  # fmt: skip
    clearing.add_argument("--cache-dir", default=str(default_cache_dir()), metavar="DIR", help=cache_dir_help)
    cache.set_defaults(run=_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("weightlift").setLevel(logging.INFO if args.verbose else logging.WARNING)
    for noisy in ("torchao", "torch.utils._pytree"):  # torchao's CUDA-only kernels, and its pytree notices
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        check_args(args)
        return args.run(args)
    except OffloadError as err:
        print(f"weightlift: error: {cli_words(str(err))}", file=sys.stderr)
        return 2
