"""Tensor parallelism (`weightlift.distributed`): each rank offloads its own DTensor shard.

The multi-rank tests launch ``torchrun`` themselves (gloo on the CPU, with a timeout): `tp_worker.py` loads
tiny models with ``tp_plan="auto"``, so every weight is a DTensor shard, and compares each offloaded run bit
for bit with the same sharded model resident. The refusals that need no second rank run in this process,
on a process group of one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import weightlift
from conftest import refused
from weightlift import OffloadConfig

WORKER = Path(__file__).parent / "tp_worker.py"


def _torchrun(tmp_path: Path, ranks: int, families: str, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", str(WORKER),
           str(tmp_path), families, *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


def _check_tiers(seen: list[dict], family: str, ranks: int) -> None:
    moe = family.endswith("_moe")
    for rank, mine in enumerate(seen):
        m = mine[family]
        assert mine["world"] == ranks and m["dtensor"] == "DTensor" and "Shard" in m["placements"]
        if moe:  # streamed expert by expert on each rank; transformers packs its gate_up_proj per rank, so a
            # shard is no block of the checkpoint's fused tensor: refused, naming the layer cache
            assert m["host"]["experts_routed"] > 0 and m["disk"]["experts_routed"] > 0
            assert "packs some fused tensors per rank" in m["checkpoint"]["refused"]
        for tier in ("host", "disk") if moe else ("host", "disk", "checkpoint"):
            t = m[tier]
            assert t["equal"] and t["equal_after_remove"] and t["still_dtensor"], (rank, tier)
            # this rank's memory: its resident shard plus its pool, and what it offloaded is its shard's rest
            assert t["device_bytes"] == t["resident_bytes"] + t["pool_bytes"]
            assert t["resident_bytes"] + t["offloaded_bytes"] == m["local_bytes"]
        if not moe:  # from the checkpoint a rank reads its own slices only: a forward reads each layer once
            ckpt = m["checkpoint"]
            assert 0.9 * ckpt["offloaded_bytes"] <= ckpt["read_one_forward"] <= 1.1 * ckpt["offloaded_bytes"], ckpt
        names = [f for f in m["disk"]["files"] if f.endswith(".safetensors")]
        assert len(names) == ranks and all(any(n.endswith(f"-rank{r}-of{ranks}.safetensors") for n in names)
                                           for r in range(ranks))  # fmt: skip
    shards = {m[family]["local_bytes"] for m in seen}
    assert len(shards) == 1  # even shards here: every rank holds the same bytes


def test_two_ranks_offload_their_shards_bitwise_agree_on_one_plan_refuse_misuse_and_run_the_cli(tmp_path):
    seen = _torchrun(tmp_path, 2, "llama,qwen3,qwen3_moe", "--misuse", "--cli")
    for family in ("llama", "qwen3", "qwen3_moe"):
        _check_tiers(seen, family, 2)
    _check_cli(tmp_path)
    plans = [m["llama"]["plan"] for m in seen]  # the refusals and the plan: on the first family
    # one plan for all: the same layers, step and tier, and the same prediction (each rank measured its own)
    assert all(p["all"] == plans[0]["all"] for p in plans) and len({json.dumps(x) for x in plans[0]["all"]}) == 1
    assert all(p["equal"] and p["fits"] and p["world_size"] == 2 for p in plans) and plans[0]["all"][0][0]
    for rank, mine in enumerate(seen):
        m = mine["llama"]
        assert "`config.prefetch_step` differs between ranks (rank 0: 1; rank 1: 2" in m["configs_differ"]
        assert f"this is rank {rank}" in m["configs_differ"] and m["hooks_after_refusal"] == 0
        assert "made for 3 tensor-parallel rank(s)" in m["plan_for_another_world"]


def _check_cli(out: Path) -> None:
    """``weightlift generate MODEL --budget`` on 2 ranks (`tp_worker.cli`): each rank loads its shard, offloads
    it under the one plan, and rank 0 alone prints the answer and every rank's memory for weights."""
    zero, one = (json.loads((out / f"cli{r}.json").read_text()) for r in (0, 1))
    assert zero["code"] == 0 and one["code"] == 0 and one["printed"] == ""  # rank 1 printed nothing
    result = json.loads(zero["printed"])
    assert result["new_tokens"] == 6 and result["text"].strip()
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["layers_offloaded"] == 4 and r["device_bytes"] <= 200 * 1024
        assert r["device_bytes"] == r["resident_bytes"] + r["pool_bytes"]
    whole = json.loads((out / "rank0.json").read_text())["llama"]["local_bytes"]  # a rank's shard of that model
    assert ranks[0]["resident_bytes"] + ranks[0]["offloaded_bytes"] == whole
    names = sorted(p.name for p in (out / "cli-cache").glob("weightlift-*.safetensors"))
    assert len(names) == 2 and names[0].endswith("-rank0-of2.safetensors")
    assert names[1].endswith("-rank1-of2.safetensors")


def test_four_ranks_offload_their_shards_bitwise(tmp_path):
    seen = _torchrun(tmp_path, 4, "llama,qwen3")
    for family in ("llama", "qwen3"):
        _check_tiers(seen, family, 4)


class _Sharded(nn.Module):
    """Blocks whose weights are DTensors on a mesh of one rank."""

    def __init__(self, mesh) -> None:
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        torch.manual_seed(0)
        self.mesh = mesh
        self.layers = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(3))
        for layer in self.layers:
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(0)]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Replicate

        for layer in self.layers:
            x = x + layer(DTensor.from_local(x, self.mesh, [Replicate()])).full_tensor()
        return x


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_dtensor_shard_streams_on_one_rank_and_comes_back_a_dtensor(one_rank, tmp_path):
    model = _Sharded(one_rank).eval()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(x)
    for config in (OffloadConfig(prefetch_step=1), OffloadConfig(source="disk", disk_path=tmp_path, prefetch_step=1)):
        with weightlift.offload(model, device="cpu", config=config), torch.inference_mode():
            out = model(x)
        assert torch.equal(out, ref)
        assert all(type(layer.weight).__name__ == "DTensor" for layer in model.layers)
    assert [p.name for p in tmp_path.glob("weightlift-*-rank0-of1.safetensors")]


def test_dtensor_shards_without_a_process_group_are_refused_untouched(one_rank):
    import torch.distributed as dist

    model = _Sharded(one_rank).eval()
    dist.destroy_process_group()
    with refused(model, "holds DTensor shards but no torch.distributed process group is initialised"):
        weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1))


@pytest.mark.parametrize(
    "shape, offsets, sizes, runs",
    [((8, 6), (4, 0), (4, 6), 1), ((8, 6), (0, 3), (8, 3), 8), ((4, 6, 2), (0, 2, 0), (4, 2, 2), 4),
     ((4, 6, 2), (1, 0, 0), (2, 6, 2), 1), ((5,), (2,), (3,), 1), ((8, 6), (0, 0), (8, 6), 1)],
    ids=["rows", "columns", "middle dim", "first dim of 3", "1-D", "whole"],
)  # fmt: skip
def test_a_shards_byte_runs_are_its_block_of_the_stored_tensor(shape, offsets, sizes, runs):
    """What a rank reads of a checkpoint tensor: the runs, gathered, are the block torch slices out."""
    from weightlift.distributed import runs_of

    whole = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    block = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].contiguous()
    raw = whole.reshape(-1).view(torch.uint8)
    found = runs_of(list(shape), list(offsets), list(sizes), 4)
    gathered = torch.empty(block.numel() * 4, dtype=torch.uint8)
    for offset, n, at in found:
        gathered[at : at + n] = raw[offset : offset + n]
    assert len(found) == runs and torch.equal(gathered.view(torch.float32).reshape(block.shape), block)


def test_a_shard_of_a_tensor_built_from_several_stored_ones_reads_its_block_from_each():
    """A fused tensor held by several stored tensors (per-expert checkpoint tensors, say) at scattered file
    offsets: the shard's pieces (`distributed.cut_pieces`) gather exactly its block."""
    from weightlift.checkpoint import Piece
    from weightlift.distributed import cut_pieces, runs_of

    shape, offsets, sizes = (4, 6, 8), (0, 0, 4), (4, 6, 4)  # experts x rows x columns, the last dim split in two
    whole = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    raw = whole.reshape(-1).view(torch.uint8)
    per = raw.numel() // 4  # four stored tensors, one per expert, written to the "file" in another order
    order = [2, 0, 3, 1]
    file = torch.cat([raw[e * per : (e + 1) * per] for e in order])
    pieces = [Piece(None, order.index(e) * per, per, e * per) for e in range(4)]
    block = whole[:, :, 4:].contiguous()
    gathered = torch.empty(block.numel() * 4, dtype=torch.uint8)
    found = cut_pieces(pieces, runs_of(list(shape), list(offsets), list(sizes), 4))
    for p in found:
        gathered[p.at : p.at + p.nbytes] = file[p.offset : p.offset + p.nbytes]
    assert sum(p.nbytes for p in found) == block.numel() * 4
    assert torch.equal(gathered.view(torch.float32).reshape(block.shape), block)
