"""Soak: thousands of identical decode steps on each tier, and offload/remove cycles, watching for leaks.

A tiny random Llama (5 layers of 64, every layer offloaded, prefetch step 2) decodes on each tier:

- ``host``: true weights in host RAM, copied into pool slots by the copy thread;
- ``disk mapped``: the layer cache file, mapped, computed on in place (``source="disk"``);
- ``disk read into slots``: the same file read into pool slots by the reader thread (``mmap=False``);
- ``checkpoint``: streamed from the model's own ``save_pretrained`` folder (``source="checkpoint"``): mapped in
  place where its tensors sit aligned for it, as this model's single file does, else read into slots (the
  row's ``source`` says which).

Every decode step does the same work: the prompt is prefilled once, then each step feeds one token
with the KV cache cropped back to the prompt's length (``DynamicCache.crop(-1)``), so nothing may grow.
A resident deep copy of the same model, with its own cache in the same state, runs the same token at
fixed checkpoints (every ``--check-every`` steps, and the last): its logits must be ``torch.equal`` to
the offloaded model's. After ``--window`` steps and at the end the process is sampled: RSS (``VmRSS`` from
``/proc/self/status``, after ``malloc_trim(0)``: memory freed to the allocator is returned, so only what is
still held counts), open fds (``/proc/self/fd``), threads (``/proc/self/status`` ``Threads`` and
``threading.active_count()``), live Python memory blocks (``sys.getallocatedblocks()``: a leak of small
objects shows there even where it reuses memory freed earlier, which RSS cannot see), hooks of every kind on
the model and weightlift's registered op keys. Asserted per tier: RSS grows by less than ``--rss-limit`` bytes
and Python blocks by fewer than 1,000 between the two samples; fds and threads equal at both and,
after ``remove()``, equal to before ``offload()``; hooks and op keys back to before; ``report()``
prefetch hits + misses equal the layer runs (offloaded layers x forwards), with no miss (decode runs the
layers in order).

Then ``--cycles`` offload/remove cycles on one model, rotating over the four tiers, each cycle one decode
step: after every ``remove()`` hooks and op keys are back to their start values; fds and threads equal
after the first round of tiers and at the end, and RSS (``--rss-limit``) and Python blocks (1,000) grow less
between those two samples; at the end the model is bitwise what it was and decodes as the resident copy.

    python benchmarks/soak.py [--steps 5000] [--cycles 500] [--threads 1] [--folder /tmp/weightlift-soak]

Writes JSON lines to benchmarks/results/soak.jsonl (and prints them), one summary line per tier, and
exits 1 when an assertion failed. ``tests/test_soak.py`` runs the same functions with smaller counts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import weightlift
from weightlift import OffloadConfig

RESULTS = Path(__file__).parent / "results"
TIERS = ("host", "disk mapped", "disk read into slots", "checkpoint")
MiB = 2**20
BLOCKS = 1000  # Python memory blocks a run may add after its window (the fixed code: under 400 in 5,000 steps)
VOCAB = 128
HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
              "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_backward_hooks")  # fmt: skip


def status(key: str) -> int:
    """The integer of ``key`` in /proc/self/status (kB for memory keys)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None)


def trim() -> None:
    """Collect garbage cycles and give memory the allocator holds free back to the OS (glibc ``malloc_trim``),
    so that RSS counts what is still allocated, not where the allocator's free lists happen to stand."""
    gc.collect()
    with contextlib.suppress(AttributeError):
        _libc.malloc_trim(0)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects alive at entry are left out of garbage collections until exit (``gc.freeze``): with torch and
    transformers loaded a full collection took 0.7 s; objects made inside are collected as usual."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def os_threads() -> int:
    """Threads of the process (``Threads`` in /proc/self/status), once two reads 10 ms apart agree: a thread
    just joined (``Thread.join`` returns once it finished its Python work) is still counted for a moment while
    it exits, and a leaked thread is counted by every read."""
    now = status("Threads")
    for _ in range(20):
        time.sleep(0.01)
        now, before = status("Threads"), now
        if now == before:
            break
    return now


def hooks(model: nn.Module) -> int:
    """Hooks of every kind registered on the modules of ``model``."""
    return sum(len(getattr(m, d, {})) for m in model.modules() for d in HOOK_DICTS)


def op_keys() -> int:
    """Hooks registered with weightlift's custom ops (`weightlift.ops`' weak registry)."""
    return len(weightlift.ops._HOOKS)


@dataclass(frozen=True)
class Sample:
    """The process and the model at one moment."""

    rss: int  # bytes (VmRSS, after `trim`)
    fds: int  # open file descriptors
    threads: int  # OS threads of the process
    py_threads: int  # Python threads alive
    hooks: int  # hooks on the model's modules
    op_keys: int  # weightlift op registry entries
    blocks: int  # memory blocks of live Python objects (`sys.getallocatedblocks`): a leak freed memory cannot hide

    @staticmethod
    def take(model: nn.Module, collect: bool = True) -> Sample:
        """Now; ``collect``: after `trim` (for RSS). Without, hooks and op keys must be gone by reference counting
        alone: a hook kept in a reference cycle would show."""
        if collect:
            trim()
        return Sample(status("VmRSS") * 1024, len(os.listdir("/proc/self/fd")), os_threads(),
                      threading.active_count(), hooks(model), op_keys(), sys.getallocatedblocks())  # fmt: skip

    def same_process(self, other: Sample) -> list[str]:
        """What differs in fds and threads (either kind)."""
        return [f"{k} {getattr(self, k)} -> {getattr(other, k)}" for k in ("fds", "threads", "py_threads")
                if getattr(self, k) != getattr(other, k)]  # fmt: skip

    def same_model(self, other: Sample) -> list[str]:
        """What differs in hooks and op keys."""
        return [f"{k} {getattr(self, k)} -> {getattr(other, k)}" for k in ("hooks", "op_keys")
                if getattr(self, k) != getattr(other, k)]  # fmt: skip


def build_model(layers: int = 5, seed: int = 0) -> nn.Module:
    """The tests' tiny Llama (`tests/conftest.py::tiny`): vocabulary 128, hidden 64, fixed seed."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def prompt(length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def token(step: int) -> torch.Tensor:
    """The token fed at decode step ``step``: varies, so each step's logits differ, with the same shapes."""
    return torch.tensor([[3 + step % (VOCAB - 3)]])


class Decoder:
    """A model with the prompt prefilled once; each `step` feeds one token and crops the cache back to the
    prompt, so every step does the same work and holds the same memory."""

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.model = model
        self.cache = DynamicCache()
        self.length = ids.shape[1]
        model(input_ids=ids, past_key_values=self.cache, use_cache=True)

    def step(self, step: int) -> torch.Tensor:
        """The logits of decode step ``step`` (one token after the prompt)."""
        logits = self.model(input_ids=token(step), past_key_values=self.cache, use_cache=True).logits
        self.cache.crop(-1)
        assert self.cache.get_seq_length() == self.length
        return logits


def tier_config(tier: str, model: nn.Module, folder: Path) -> OffloadConfig:
    """Every layer offloaded, prefetch step 2, from ``tier``; the checkpoint tier saves ``model`` into
    ``folder / "checkpoint"`` first (if not there)."""
    if tier == "host":
        return OffloadConfig(prefetch_step=2)
    if tier in ("disk mapped", "disk read into slots"):
        return OffloadConfig(prefetch_step=2, source="disk", disk_path=str(folder / "cache"),
                             mmap=tier == "disk mapped")  # fmt: skip
    if tier == "checkpoint":
        ckpt = folder / "checkpoint"
        if not (ckpt / "model.safetensors").exists():
            model.save_pretrained(ckpt)
        return OffloadConfig(prefetch_step=2, source="checkpoint", disk_path=str(ckpt))
    raise ValueError(f"tier {tier!r}: one of {TIERS}")


def counters(handle: weightlift.OffloadHandle, forwards: int) -> dict:
    report = handle.report()
    return {"layers_offloaded": report.layers_offloaded, "forwards": forwards, "prefetch_hits": report.prefetch_hits,
            "prefetch_misses": report.prefetch_misses, "layer_runs": report.layers_offloaded * forwards,
            "copies": report.copies, "source": report.source}  # fmt: skip


def soak_tier(tier: str, folder: Path, steps: int = 5000, window: int = 200, check_every: int = 500,
              layers: int = 5, rss_limit: int = MiB, blocks_limit: int = BLOCKS) -> dict:  # fmt: skip
    """``steps`` decode steps of an offloaded tiny Llama on ``tier`` against a resident copy: the row, with
    ``failures`` (empty when every property held)."""
    assert steps > window, (steps, window)
    model = build_model(layers)
    resident = copy.deepcopy(model)
    ids = prompt()
    start = time.perf_counter()
    with torch.inference_mode(), frozen_heap():
        ref = Decoder(resident, ids)
        ref.step(0)  # torch's intra-op threads start with the first forward, before `before` is taken
        config = tier_config(tier, model, folder)
        before = Sample.take(model, collect=False)
        checks, unequal = 0, []
        with weightlift.offload(model, device="cpu", config=config) as handle:
            decoder = Decoder(model, ids)
            for step in range(steps):
                logits = decoder.step(step)
                if step % check_every == 0 or step == steps - 1:
                    checks += 1
                    if not torch.equal(logits, ref.step(step)):
                        unequal.append(step)
                if step == window - 1:
                    at_window = Sample.take(model)
            end = Sample.take(model)
            row = counters(handle, forwards=1 + steps)
        after = Sample.take(model, collect=False)
    row.update(tier=tier, steps=steps, window=window, checkpoints=checks, unequal_at=unequal,
               rss_growth=end.rss - at_window.rss, rss_limit=rss_limit, blocks_growth=end.blocks - at_window.blocks,
               blocks_limit=blocks_limit,
               samples={"before": asdict(before), "at_window": asdict(at_window), "end": asdict(end),
                        "after_remove": asdict(after)},
               wall_s=time.perf_counter() - start)  # fmt: skip
    row["failures"] = tier_failures(row)
    return row


def tier_failures(row: dict) -> list[str]:
    """The properties a tier's row must have, as messages for those that failed."""
    s = {k: Sample(**v) for k, v in row["samples"].items()}
    out = [f"logits differ from resident at step {step}" for step in row["unequal_at"]]
    if row["rss_growth"] >= row["rss_limit"]:
        out.append(f"RSS grew {row['rss_growth']} bytes after step {row['window']} (limit {row['rss_limit']})")
    if row["blocks_growth"] >= row["blocks_limit"]:
        out.append(f"{row['blocks_growth']} more Python memory blocks after step {row['window']}")
    out += [f"while offloaded: {d}" for d in s["at_window"].same_process(s["end"])]
    out += [f"after remove(): {d}" for d in s["before"].same_process(s["after_remove"])]
    out += [f"after remove(): {d}" for d in s["before"].same_model(s["after_remove"])]
    if row["prefetch_hits"] + row["prefetch_misses"] != row["layer_runs"]:
        out.append(f"hits {row['prefetch_hits']} + misses {row['prefetch_misses']} != layer runs {row['layer_runs']}")
    if row["prefetch_misses"]:
        out.append(f"{row['prefetch_misses']} prefetch misses in an in-order decode")
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def soak_cycles(folder: Path, cycles: int = 500, layers: int = 5, rss_limit: int = MiB, blocks_limit: int = BLOCKS
                ) -> dict:  # fmt: skip
    """``cycles`` offload/remove cycles on one model, the tiers in turn, one decode step each: the row, with
    ``failures``."""
    rounds = cycles // len(TIERS)
    assert rounds >= 2, f"at least {2 * len(TIERS)} cycles"
    model = build_model(layers)
    resident = copy.deepcopy(model)
    ids = prompt()
    original = snapshot(model)
    configs = [tier_config(tier, model, folder) for tier in TIERS]
    start = time.perf_counter()
    with torch.inference_mode(), frozen_heap():
        ref = Decoder(resident, ids).step(0)
        before = Sample.take(model, collect=False)
        drift, at_round = [], None
        for cycle in range(rounds * len(TIERS)):
            with weightlift.offload(model, device="cpu", config=configs[cycle % len(TIERS)]):
                Decoder(model, ids).step(0)
            now = Sample(0, 0, 0, 0, hooks(model), op_keys(), 0)
            drift += [f"cycle {cycle}: {d}" for d in before.same_model(now)]
            if cycle == len(TIERS) - 1:
                at_round = Sample.take(model)
        end = Sample.take(model)
        equal = torch.equal(Decoder(model, ids).step(0), ref)
    restored = snapshot(model)
    bitwise = restored.keys() == original.keys() and all(torch.equal(restored[k], v) for k, v in original.items())
    row = {"tier": "offload/remove cycles", "cycles": rounds * len(TIERS), "rss_growth": end.rss - at_round.rss,
           "blocks_growth": end.blocks - at_round.blocks, "blocks_limit": blocks_limit,
           "rss_limit": rss_limit, "drift": drift[:10], "equal": equal, "bitwise": bitwise,
           "samples": {"before": asdict(before), "after_first_round": asdict(at_round), "end": asdict(end)},
           "wall_s": time.perf_counter() - start}  # fmt: skip
    row["failures"] = cycle_failures(row)
    return row


def cycle_failures(row: dict) -> list[str]:
    s = {k: Sample(**v) for k, v in row["samples"].items()}
    out = list(row["drift"])
    if row["rss_growth"] >= row["rss_limit"]:
        out.append(f"RSS grew {row['rss_growth']} bytes after the first round (limit {row['rss_limit']})")
    if row["blocks_growth"] >= row["blocks_limit"]:
        out.append(f"{row['blocks_growth']} more Python memory blocks after the first round")
    out += s["after_first_round"].same_process(s["end"]) + s["before"].same_model(s["end"])
    if not row["bitwise"]:
        out.append("the model after the last remove() is not bitwise what it was")
    if not row["equal"]:
        out.append("logits after the cycles differ from resident")
    return out


def summary(row: dict) -> str:
    """One line: what ran, RSS growth, fds and threads before/after, wall time, and OK or the failures."""
    s = row["samples"]
    first, last = (s["at_window"], s["end"]) if "at_window" in s else (s["after_first_round"], s["end"])
    what = f"{row['steps']} steps" if "steps" in row else f"{row['cycles']} cycles"
    verdict = "OK" if not row["failures"] else "FAIL: " + "; ".join(row["failures"])
    return (f"{row['tier']:<22} {what:>12}: RSS {row['rss_growth'] / 1024:+.1f} KiB, Python blocks "
            f"{row['blocks_growth']:+d}, fds {first['fds']} -> "
            f"{last['fds']}, threads {first['threads']} -> {last['threads']}, {row['wall_s']:.1f} s  {verdict}")


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    """``path`` (emptied first) or a temporary folder."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="weightlift-soak-") as tmp:
            yield Path(tmp)
        return
    shutil.rmtree(path, ignore_errors=True)
    Path(path).mkdir(parents=True)
    yield Path(path)


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--window", type=int, default=200, help="RSS, fds and threads are compared from this step on")
    ap.add_argument("--check-every", type=int, default=500)
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--rss-limit", type=int, default=MiB, help="bytes")
    ap.add_argument("--tiers", nargs="*", default=list(TIERS), choices=TIERS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: two threads spinning on a "
                    "shared 2-core box made each step of this tiny model 10x slower)")
    ap.add_argument("--folder", default=None, help="work folder (emptied); a temporary one by default")
    ap.add_argument("--out", default=str(RESULTS / "soak.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"Python {platform.python_version()}, {args.threads} torch thread(s)")  # fmt: skip
    rows, lines = [], []
    with workdir(args.folder) as folder:
        for tier in args.tiers:
            rows.append(soak_tier(tier, folder, args.steps, args.window, args.check_every, rss_limit=args.rss_limit))
            lines.append(summary(rows[-1]))
            emit(lines[-1])
        if args.cycles:
            rows.append(soak_cycles(folder, args.cycles, rss_limit=args.rss_limit))
            lines.append(summary(rows[-1]))
            emit(lines[-1])
    compared = {"compared_with": "a resident deep copy of the same model (logits, torch.equal), and the process "
                                 "itself at the window and at the end (RSS, fds, threads) and before offload()"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for row in rows:
            f.write(json.dumps({"bench": "soak", "machine": machine, **compared, **row}) + "\n")
    failed = [row["tier"] for row in rows if row["failures"]]
    emit(f"soak: {len(rows) - len(failed)} of {len(rows)} rows OK" + (f"; failed: {', '.join(failed)}" * bool(failed)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
