"""The commands that run a model: `demo`, `bench` (its knobs, or a budget) and `generate`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import cli_models as models
from . import cli_tp
from .cli_checks import check_budgets
from .config import OffloadConfig, format_size
from .errors import OffloadError

log = logging.getLogger(__name__)


DEMO_PROMPT = "Explain in two sentences why the sky is blue."


def demo(args: argparse.Namespace) -> int:
    from . import offload
    from .config import resolve_device
    from .hf import chat_ids, greedy, smollm2_file

    device = resolve_device(args.device)
    config = _offload_config(args, device)
    source = config.source
    path = smollm2_file()
    args.model = "smollm2"
    model, tokenizer = models.load(args)  # from its conversion in the cache (written on the first run)
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
            + (f" ({format_size(report.pool_bytes)} of it mapped from the page cache, which the kernel takes back when "
               "memory is short; a budget holds less: `weightlift generate smollm2 --budget 200MiB`)"
               if report.source.endswith("(mapped)") else "")
        )
    return 0 if same else 1


def _offload_config(args: argparse.Namespace, device) -> OffloadConfig:
    source = args.source or ("disk" if device.type == "cpu" else "host")
    disk = {"source": source, "disk_path": args.cache_dir} if source != "host" else {}
    return OffloadConfig(group_size=args.group_size, num_in_group=args.num_in_group,
                         prefetch_step=args.prefetch_step, **disk)  # fmt: skip


def bench(args: argparse.Namespace) -> int:
    from . import offload
    from .config import resolve_device
    from .hf import chat_ids, measure_decode

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.budget is not None:
        return _bench_plan(args, device)
    config = _offload_config(args, device)
    model, tokenizer = models.load(args)
    ids = chat_ids(tokenizer, DEMO_PROMPT) if tokenizer is not None else torch.arange(3, 35)[None]
    model.to(device)
    with models.phase("measuring resident prefill and decode"):
        resident = measure_decode(model, ids.to(device), args.tokens)
    model.to("cpu")
    with models.phase("setting up the offload (writing the layer cache on the first run)"):
        handle = offload(model, device=device, config=config)
    with handle:
        copied_before = handle.report().copy_seconds  # the copies primed at setup are not part of the run
        handle.timeline.events.clear()
        starts = [("prefill", time.perf_counter())]  # where each forward starts, for the plot
        with models.phase("measuring offloaded prefill and decode"):
            offloaded = measure_decode(model, ids.to(device), args.tokens,
                                       before_token=lambda: starts.append(("decode", time.perf_counter())))  # fmt: skip
        report = handle.report()
        if args.trace:
            handle.trace(args.trace)
        handle.timeline.resolve()
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

        runs = {"resident": {"prefill": resident["prefill_s"], "decode": step_resident},
                "offloaded": {"prefill": offloaded["prefill_s"], "decode": step_offloaded}}  # fmt: skip
        plot_timeline(events, runs, args.plot, forwards=starts)
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


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives (the first ``put`` after the
    prompt's) and passes everything on to ``inner``."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.prompt_seen = False
        self.at: float | None = None

    def put(self, value) -> None:
        if self.prompt_seen and self.at is None:
            self.at = time.perf_counter()
        self.prompt_seen = True
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM from /proc/self/status, else ``getrusage``."""
    from .machine import proc_kib_field

    found = proc_kib_field("/proc/self/status", "VmHWM")
    if found is not None:
        return found
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _check_vocab(args: argparse.Namespace, folder: Path, tokenizer, ids: torch.Tensor) -> None:
    """The prompt's token ids index the model's embedding: a tokenizer larger than the vocabulary (the
    folder's config.json says) is refused before anything is loaded."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    vocab = config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))
    if not isinstance(vocab, int):
        return
    top = int(ids.max()) if ids.numel() else -1
    if top >= vocab:
        raise OffloadError(
            f"`MODEL`={args.model!r}: its tokenizer has {len(tokenizer)} tokens and gives id {top}, but the model's "
            f"vocabulary has {vocab} (config.json vocab_size): the tokenizer files belong to another model; "
            "put the model's own tokenizer in the folder"
        )
    if len(tokenizer) > vocab:
        log.warning("the tokenizer has %d tokens but the model's vocabulary only %d: ids from %d on would fail",
                    len(tokenizer), vocab, vocab)  # fmt: skip


def _footprint(folder, prompt_tokens: int, new_tokens: int, dtype):
    """What generating ``new_tokens`` after a prompt holds besides the weights (`weightlift.footprint`)."""
    from transformers import AutoConfig

    from .footprint import RunFootprint

    with models.quiet():
        config = AutoConfig.from_pretrained(folder)
    return RunFootprint.of(config, prompt_tokens, new_tokens, dtype)


def _model_for(args: argparse.Namespace, folder, device, saved, ranks: int, prompt_tokens: int):
    """``(model, handle, plan)`` for generate: a rank's shard under torchrun; streamed for ``--budget``, a
    saved plan, or (given neither) the memory this machine has when the model and its run do not fit it;
    else the whole model, resident (handle and plan None)."""
    reserve = _footprint(folder, prompt_tokens, args.tokens, models.dtype_of(args))
    if args.budget is None and saved is None and ranks == 1:  # plan for what this machine has, if it must
        args.budget = models.fitting_budget(args, folder, device, reserve)
        if args.budget is not None:
            folder = models.folder_of(args, stream=True)
    if ranks > 1:
        model, handle = cli_tp.load(args, folder, device, saved)
        return model, handle, handle.plan if handle is not None else None
    if args.budget is not None or saved is not None:
        model, handle = models.stream(args, device, saved, folder, reserve=reserve)
        return model, handle, handle.plan
    model = models.load_model(args, folder)  # the tokenizer is loaded already
    return model.to(device), None, None


def generate(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from .config import resolve_device
    from .hf import chat_ids, steady_output_head, tokenizer_of

    saved = check_budgets(args)
    device = resolve_device(args.device)
    ranks, rank = cli_tp.world(), 0
    if ranks > 1:  # under torchrun: each rank its shard (tp_plan="auto"), one plan for all, rank 0 prints
        device, rank = cli_tp.start(device)
    folder = models.folder_of(args, stream=(args.budget is not None or saved is not None) and ranks == 1)
    with models.quiet():
        tokenizer = tokenizer_of(folder)
    if tokenizer is None:
        raise OffloadError(f"`MODEL`={args.model!r} has no tokenizer files: generate needs a tokenizer")
    ids = chat_ids(tokenizer, args.prompt)
    _check_vocab(args, folder, tokenizer, ids)
    model, handle, plan = _model_for(args, folder, device, saved, ranks, prompt_tokens=ids.shape[1])
    steady_output_head(model)
    ids = ids.to(device)
    inner = None
    if not args.json and rank == 0:
        from transformers import TextStreamer

        inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    streamer = _FirstToken(inner)
    with handle if handle is not None else nullcontext():
        sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p or 1.0} \
            if args.temperature else {"do_sample": False}  # fmt: skip
        if args.seed is not None:
            torch.manual_seed(args.seed)
        with models.phase(f"generating up to {args.tokens} tokens"), torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                 streamer=streamer, pad_token_id=tokenizer.eos_token_id, **sampling)  # fmt: skip
            seconds = time.perf_counter() - start
        report = handle.report() if handle is not None else None
    first = streamer.at - start if streamer.at is not None else None
    new = out[0, ids.shape[1]:]
    local = [t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers())]
    held = report.device_bytes if report is not None else sum(t.numel() * t.element_size() for t in local)
    after_first = (new.numel() - 1) / (seconds - first) if first is not None and new.numel() > 1 else None
    predicted = 1 / plan.workloads["decode"].predicted_s if plan is not None and "decode" in plan.workloads else None
    summary = {"model": args.model, "device": str(device), "new_tokens": int(new.numel()),
               "tokens_per_s": new.numel() / seconds, "time_to_first_token_s": first, "weights_bytes": held,
               "decode_tokens_per_s": after_first, "predicted_decode_tokens_per_s": predicted,
               "layers_offloaded": report.layers_offloaded if report else 0}  # fmt: skip
    if report is not None and report.experts is not None:
        summary["experts"] = report.to_dict()["experts"]
    if ranks > 1:
        summary["ranks"] = cli_tp.summary(rank, report, held, peak_rss_bytes())
        cli_tp.finish()
        if rank != 0:
            return 0
    if args.json:
        extra = {"peak_rss_bytes": peak_rss_bytes(), "plan": None}
        if plan is not None:
            predicted = {name: w.predicted_s for name, w in plan.workloads.items()}
            extra["plan"] = {"summary": plan.summary(), "predicted_s_per_forward": predicted, "budget": plan.budget,
                             "device_bytes": plan.device_bytes, "kv_cache_bytes": plan.kv_cache_bytes,
                             "activation_bytes": plan.activation_bytes}  # fmt: skip
        text = tokenizer.decode(new, skip_special_tokens=True)
        print(json.dumps({**summary, **extra, "text": text, "token_ids": new.tolist()}, indent=2))
    else:
        ttft = f"first token after {first:.2f} s, " if first is not None else ""
        if after_first is not None:
            ttft += f"{after_first:.2f} tokens/s after it" + (f" (the plan predicted {predicted:.2f})" if predicted
                                                              else "") + ", "  # fmt: skip
        print(f"\n[{summary['new_tokens']} tokens, {ttft}{summary['tokens_per_s']:.1f} tokens/s in all, weights in "
              f"{'RAM' if device.type == 'cpu' else device}: {format_size(held)}, "
              f"{summary['layers_offloaded']} layers offloaded]", file=sys.stderr)  # fmt: skip
        for r in summary.get("ranks", []):
            print(f"[rank {r['rank']}: weights {format_size(r['device_bytes'])}, {r['layers_offloaded']} layers "
                  f"offloaded, peak RSS {format_size(r['peak_rss_bytes'])}]", file=sys.stderr)  # fmt: skip
    return 0


def _bench_plan(args: argparse.Namespace, device) -> int:
    """Predicted vs measured seconds per forward (prefill and decode) under the plan for ``--budget``."""
    from .measure import language_model_workloads, time_forwards

    check_budgets(args)
    model, handle = models.stream(args, device, reuse=False)  # planned afresh; no resident times (the whole model)
    plan = handle.plan
    runners = language_model_workloads(model, device)
    resident: dict = {}
    with handle:
        with models.phase("timing the offloaded forwards"):
            measured = time_forwards(runners, device)
        report = handle.report()
        if args.trace:
            handle.trace(args.trace)
    rows = {name: {"predicted_s": plan.workloads[name].predicted_s, "measured_s": measured[name],
                   "resident_s": resident.get(name),
                   "error": measured[name] / plan.workloads[name].predicted_s - 1} for name in measured}  # fmt: skip
    result = {"model": args.model, "device": str(device), "budget": plan.budget, "threads": torch.get_num_threads(),
              "layers_offloaded": len(plan.offloaded), "prefetch_step": plan.prefetch_step, "bound": plan.bound,
              "forwards": rows, "plan": plan.to_dict(), "report": report.to_dict()}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    print(plan.summary())
    print(f"\n{'forward':10}{'predicted ms':>14}{'measured ms':>13}{'error':>8}{'resident ms':>13}")
    for name, row in rows.items():
        res = f"{row['resident_s'] * 1e3:>13.2f}" if row["resident_s"] is not None else f"{'-':>13}"
        print(f"{name:10}{row['predicted_s'] * 1e3:>14.2f}{row['measured_s'] * 1e3:>13.2f}{row['error']:>+8.0%}{res}")
    print(f"\nmeasured device memory for weights {format_size(report.device_bytes)} "
          f"(plan: {format_size(plan.device_bytes)}, budget {format_size(plan.budget)})")  # fmt: skip
    return 0
