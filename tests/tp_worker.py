"""One rank of a tensor-parallel run (launched by `test_distributed.py` under ``torchrun``, gloo on the CPU).

Each family's tiny model is loaded with ``tp_plan="auto"`` (every weight a ``DTensor`` shard), run resident
for the reference, then offloaded on this rank with the host tier, the disk tier and a plan; each result is
compared bit for bit with the reference. What this rank saw is written as JSON to ``OUT/rank<R>.json``.

    torchrun --nproc-per-node N tests/tp_worker.py OUT FAMILY[,FAMILY...] [--misuse] [--cli] [--cuda]

``--misuse``: also the refusals and a plan, for the first family. ``--cli``: last, ``weightlift generate
--budget`` in this process group (`weightlift.cli_tp`), rank 0's output kept in ``OUT/cli.json``.
``--cuda``: NCCL, each rank on its own GPU (``cuda:LOCAL_RANK``); else gloo on the CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

import transformers as tf

import weightlift
from weightlift import OffloadConfig, OffloadError

VOCAB = 128
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=4, num_hidden_layers=4, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0),
    "qwen3": lambda: tf.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=4, num_hidden_layers=4, head_dim=16, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0),
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                           num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=4,
                                           head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0),
}  # fmt: skip


def run(model, ids, new_tokens: int = 8):
    with torch.inference_mode():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    return logits, gen


def read_chars() -> int:
    """Bytes this process has read with read/pread calls (``rchar`` of /proc/self/io: page cache hits too)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def local_bytes(model) -> int:
    """This rank's bytes of every parameter and buffer: the local shard of each DTensor."""
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def main() -> None:
    out, families, misuse = Path(sys.argv[1]), sys.argv[2].split(","), "--misuse" in sys.argv
    dev = torch.device("cpu")
    if "--cuda" in sys.argv:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: dict = {"rank": rank, "world": world, "device": str(dev)}
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1)).to(dev)
    for family in families:
        folder = out / f"model-{family}"
        if rank == 0:
            torch.manual_seed(0)
            tf.AutoModelForCausalLM.from_config(CONFIGS[family]()).save_pretrained(folder)
        dist.barrier()
        model = tf.AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto").eval()
        mlp = model.model.layers[0].mlp
        weight = mlp.experts.down_proj if hasattr(mlp, "experts") else mlp.down_proj.weight
        mine: dict = {"dtensor": type(weight).__name__, "placements": str(weight.placements),
                      "local_bytes": local_bytes(model)}  # fmt: skip
        ref = run(model, ids)
        tiers = {"host": OffloadConfig(prefetch_step=1),
                 "disk": OffloadConfig(prefetch_step=1, source="disk", disk_path=out / f"cache-{family}"),
                 "checkpoint": OffloadConfig(prefetch_step=1, source="checkpoint", disk_path=folder,
                                             mmap=False)}  # fmt: skip
        for tier, config in tiers.items():
            try:
                handle = weightlift.offload(model, device=dev, config=config)
            except OffloadError as e:  # (fused experts from per-expert checkpoint tensors)
                mine[tier] = {"refused": str(e)}
                continue
            with handle:
                got = run(model, ids)
                report = handle.report()
                before = read_chars()
                with torch.inference_mode():
                    model(ids)  # one forward reads every offloaded layer once (the first, for the next forward)
                if handle.engine is not None:  # that read runs on the read-ahead thread: let it finish
                    handle.engine.synchronize()
                read = read_chars() - before
                held = handle.layers[0].module.mlp
                shard = held.experts.down_proj if hasattr(held, "experts") else held.down_proj.weight
                experts = report.experts
                files = sorted(p.name for p in (out / f"cache-{family}").glob("weightlift-*")) if tier == "disk" else []
            mine[tier] = {
                "equal": bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])),
                "still_dtensor": type(shard).__name__ == "DTensor",
                "device_bytes": report.device_bytes, "resident_bytes": report.resident_bytes,
                "pool_bytes": report.pool_bytes, "offloaded_bytes": report.offloaded_bytes, "files": files,
                "read_one_forward": read,
                "experts_routed": experts.routed if experts is not None else None,
            }  # fmt: skip
            after = run(model, ids)
            mine[tier]["equal_after_remove"] = bool(torch.equal(after[0], ref[0]) and torch.equal(after[1], ref[1]))
        if misuse and family == families[0]:
            try:  # each rank a different prefetch step
                weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1 + rank))
                mine["configs_differ"] = "not refused"
            except OffloadError as e:
                mine["configs_differ"] = str(e)
            mine["hooks_after_refusal"] = sum(len(m._forward_pre_hooks) for m in model.modules())
            budget = int(0.8 * local_bytes(model))
            plan = weightlift.plan(model, device="cpu", budget=budget, disk_path=out / f"plan-{family}", reps=2)
            plans: list = [None] * world
            dist.all_gather_object(plans, [plan.offloaded, plan.prefetch_step, plan.source, plan.predicted_s])
            with weightlift.offload(model, device="cpu", plan=plan) as handle:
                got = run(model, ids)
                fits = handle.report().device_bytes <= budget
            mine["plan"] = {"all": plans, "world_size": plan.world_size, "fits": fits,
                            "equal": bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))}  # fmt: skip
            plan.world_size = world + 1
            try:
                weightlift.offload(model, device="cpu", plan=plan)
                mine["plan_for_another_world"] = "not refused"
            except OffloadError as e:
                mine["plan_for_another_world"] = str(e)
        seen[family] = mine
        del model
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    if "--cli" in sys.argv:
        cli(out, rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cli(out: Path, rank: int) -> None:
    """``weightlift generate MODEL --budget --json`` on every rank of this group (it ends the group): rank 0
    prints the answer and every rank's memory, the others print nothing."""
    import contextlib
    import io

    from conftest import save_tokenizer
    from weightlift.cli import main as weightlift_main

    folder = out / "cli-model"
    if rank == 0:
        torch.manual_seed(0)
        config = CONFIGS["llama"]()
        config.bos_token_id, config.eos_token_id = VOCAB - 2, VOCAB - 1
        tf.LlamaForCausalLM(config).save_pretrained(folder)
        save_tokenizer(folder, VOCAB)
    dist.barrier()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = weightlift_main(["generate", str(folder), "--prompt", "w1 w2 w3", "--tokens", "6", "--budget", "200KiB",
                                "--device", "cpu", "--json", "--cache-dir", str(out / "cli-cache")])  # fmt: skip
    (out / f"cli{rank}.json").write_text(json.dumps({"code": code, "printed": printed.getvalue()}))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
