"""The command line under ``torchrun``: each rank loads its shard (``tp_plan="auto"``), offloads it under the
budget (every rank the same plan, `weightlift.distributed`), and generates in lock step; rank 0 prints the
answer and a memory summary gathered from every rank.

    torchrun --nproc-per-node N -m weightlift generate MODEL --budget 6GiB --prompt "..."
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import cli_models as models


def world() -> int:
    """The world size torchrun says this process is in (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def start(device: torch.device) -> tuple[torch.device, int]:
    """Join the process group (gloo on a CPU, nccl on CUDA, one GPU per local rank): ``(device, rank)``."""
    import datetime

    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    return device, dist.get_rank()


def load(args: argparse.Namespace, folder: Path, device: torch.device, saved=None):
    """This rank's shard of the model in ``folder``, offloaded under ``--budget`` or the saved plan (or
    resident without either): ``(model, handle or None)``."""
    from transformers import AutoModelForCausalLM

    import weightlift

    with models.phase(f"loading this rank's shard of {args.model}"), models.quiet():
        model = AutoModelForCausalLM.from_pretrained(folder, tp_plan="auto", dtype=models.dtype_of(args) or "auto")
    model.eval()
    if args.budget is None and saved is None:
        return model.to(device), None
    if saved is None:  # measured on every rank; every rank then uses the plan of the slowest prediction
        with models.phase(f"planning for --budget {args.budget} on every rank"):
            saved = weightlift.plan(model, device=device, budget=args.budget, host_budget=args.host_budget,
                                    disk_path=args.cache_dir)  # fmt: skip
    return model, weightlift.offload(model, device=device, plan=saved)


def summary(rank: int, report, held: int, peak_rss: int) -> list[dict]:
    """Every rank's memory for weights (gathered): ``held`` device bytes, and with offloading what of them."""
    import torch.distributed as dist

    mine = {"rank": rank, "device_bytes": held, "layers_offloaded": 0, "peak_rss_bytes": peak_rss}
    if report is not None:
        mine.update(resident_bytes=report.resident_bytes, pool_bytes=report.pool_bytes,
                    offloaded_bytes=report.offloaded_bytes, layers_offloaded=report.layers_offloaded)  # fmt: skip
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
