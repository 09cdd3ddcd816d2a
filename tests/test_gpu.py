"""Accelerator engine: side-stream copies from pinned host memory. Skipped without an accelerator."""

from __future__ import annotations

import pytest
import torch

import weightlift
from conftest import FAMILIES, assert_same, prompt, run, snapshot, tiny
from weightlift import OffloadConfig

pytestmark = pytest.mark.gpu


def _device() -> torch.device:
    return torch.accelerator.current_accelerator()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group,num,step", [(1, 1, 1), (1, 1, 2), (1, 1, 3), (3, 2, 2), (1, 1, 9)])
def test_gpu_offloaded_equals_resident_on_the_same_device(family, group, num, step):
    dev = _device()
    model = tiny(family)
    ids = prompt().to(dev)
    snap = snapshot(model)
    model.to(dev)
    ref_logits, ref_tokens = run(model, ids)
    model.to("cpu")
    config = OffloadConfig(group_size=group, num_in_group=num, prefetch_step=step)
    with weightlift.offload(model, device=dev, config=config) as handle:
        logits, tokens = run(model, ids)
        report = handle.report()
        laid_out = sum(layer.master.layout.nbytes for layer in handle.layers)
        assert all(block.is_pinned() for block in handle.arena.blocks)
        assert laid_out <= report.host_bytes <= 1.05 * laid_out  # power-of-two arena blocks: no rounding
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert report.prefetch_misses == 0
    assert_same(model, snap)  # back on the CPU, bitwise


def test_gpu_device_memory_is_resident_plus_pool():
    dev = _device()
    model = tiny("llama", layers=8)
    torch.accelerator.synchronize()
    before = torch.accelerator.memory_allocated(dev)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
        torch.accelerator.synchronize()
        held = torch.accelerator.memory_allocated(dev) - before
        report = handle.report()
        resident = {id(t) for t in (*model.parameters(), *model.buffers())} - {
            id(e.tensor) for layer in handle.layers for e in layer.master.layout.entries
        }
        # the caching allocator rounds each resident tensor up to 512 bytes; the pool slots are multiples of 512
        assert report.device_bytes <= held <= report.device_bytes + 512 * len(resident)
    torch.accelerator.synchronize()
    assert torch.accelerator.memory_allocated(dev) == before


def test_gpu_state_dict_and_remove_from_a_model_that_started_on_the_gpu():
    dev = _device()
    model = tiny("llama").to(dev)
    ids = prompt().to(dev)
    ref, _ = run(model, ids)
    snap = snapshot(model)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)):
        state = model.state_dict()
        for key, (value, *_rest) in snap.items():  # `snapshot` keeps each tensor's leaves: one for plain ones
            if key in state:
                assert torch.equal(state[key].to(dev), value[0])
        assert torch.equal(run(model, ids)[0], ref)
    assert_same(model, snap)


@pytest.mark.parametrize("fmt", ["int4", "int8", "bnb-nf4"])
def test_gpu_quantized_formats(fmt):
    """torchao int4 weight-only runs only on CUDA; the others are checked on the accelerator too."""
    dev = _device()
    model = tiny("llama").to(dev)
    if fmt == "bnb-nf4":
        pytest.importorskip("bitsandbytes")
        from test_quantized import _bnb4, _replace_linears

        model.cpu()
        _replace_linears(model, lambda lin: _bnb4("nf4", True)(lin).to(dev))
        model.to(dev)
    else:
        pytest.importorskip("torchao")
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        model.to(torch.bfloat16)
        if fmt == "int4" and dev.type != "cuda":
            pytest.skip(f"torchao's int4 weight-only packs for CUDA only; this accelerator is {dev.type}")
        config = Int4WeightOnlyConfig(group_size=32) if fmt == "int4" else Int8WeightOnlyConfig()
        try:
            quantize_(model.model.layers, config)
        except ImportError as err:  # int4 on CUDA imports the mslk kernels (PyPI has only a placeholder)
            pytest.skip(f"torchao {fmt} on this accelerator needs a package missing here: {err}"[:300])
    ids = prompt().to(dev)
    ref = run(model, ids)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
        out = run(model, ids)
        assert handle.report().prefetch_misses == 0
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert torch.equal(run(model, ids)[0], ref[0])


@pytest.mark.parametrize("source", ["disk", "checkpoint"])
def test_gpu_streams_from_disk_through_the_staging_ring(tmp_path, source):
    dev = _device()
    model = tiny("llama")
    if source == "checkpoint":
        model.save_pretrained(tmp_path, max_shard_size="200KB")
    ids = prompt().to(dev)
    model.to(dev)
    ref = run(model, ids)
    model.to("cpu")
    config = OffloadConfig(source=source, disk_path=str(tmp_path), prefetch_step=2)
    with weightlift.offload(model, device=dev, config=config) as handle:
        out = run(model, ids)
        report = handle.report()
        assert all(slab.is_pinned() for slab in handle.ring.slabs)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert report.prefetch_misses == 0 and report.host_bytes >= 2 * report.slot_bytes


@pytest.mark.parametrize("source", ["disk", "checkpoint"])
def test_gpu_model_already_on_the_device_streams_from_disk(tmp_path, source):
    """The weights are on the accelerator before offloading: the layer cache is written (and its digest taken)
    and the checkpoint is compared from device memory, the outputs equal the resident model's, and after
    `remove()` the model is back on the device, bitwise."""
    dev = _device()
    model = tiny("llama").to(dev)
    if source == "checkpoint":
        model.save_pretrained(tmp_path, max_shard_size="200KB")
    ids = prompt().to(dev)
    ref = run(model, ids)
    snap = snapshot(model)
    config = OffloadConfig(source=source, disk_path=str(tmp_path), prefetch_step=2)
    with weightlift.offload(model, device=dev, config=config) as handle:
        out = run(model, ids)
        report = handle.report()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert report.layers_offloaded == 5 and report.prefetch_misses == 0
    assert_same(model, snap)
    if source == "disk":  # the digest of the device bytes matches the file's: the cache is reused, not rewritten
        (cache,) = tmp_path.glob("weightlift-*.safetensors")
        stamp = cache.stat().st_mtime_ns
        with weightlift.offload(model, device=dev, config=config):
            again = run(model, ids)
        assert cache.stat().st_mtime_ns == stamp
        assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])
        assert_same(model, snap)


@pytest.mark.parametrize("source", ["host", "disk"])
def test_gpu_quantized_model_on_the_device_frees_its_original_weights(tmp_path, source):
    """torchao int8 weights already on the accelerator: once offloaded, their original device storages are
    freed (checked with gc off, see test_leaks.py), so device memory is the resident part plus the pool."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from test_leaks import _no_gc, _watch

    dev = _device()
    model = tiny("llama").to(dev).to(torch.bfloat16)
    quantize_(model.model.layers, Int8WeightOnlyConfig())
    ids = prompt().to(dev)
    ref = run(model, ids)
    tensors, storages = _watch(model.model.layers)
    torch.accelerator.synchronize()
    full = torch.accelerator.memory_allocated(dev)
    extra = {"source": "disk", "disk_path": str(tmp_path)} if source == "disk" else {}
    with _no_gc(), weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2, **extra)) as handle:
        torch.accelerator.synchronize()
        held = torch.accelerator.memory_allocated(dev)
        report = handle.report()
        assert [r.expired() for r in storages] == [True] * len(storages)
        assert all(r() is None for r in tensors)
        assert report.pool_bytes < report.offloaded_bytes  # 3 slots for 5 layers
        assert held <= full - report.offloaded_bytes + report.pool_bytes  # the allocator rounds freed blocks up
        out = run(model, ids)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need CUDA; this accelerator is not CUDA")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_cuda_graph_replays_an_offloaded_step(compiled):
    """A captured forward replays with the same copies into the same slots: replays with new inputs equal
    the same step run without a graph (eager: equal to the resident model), and the slots are left as the
    capture found them, so eager runs after the replays are right too."""
    dev = _cuda()
    torch._dynamo.reset()
    model = tiny("llama").to(dev)
    inputs = [prompt(seed=s).to(dev) for s in (1, 2, 3)]
    with torch.inference_mode():
        refs = [model(ids).logits for ids in inputs]
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
        step = torch.compile(model) if compiled else model
        static = inputs[0].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(side):  # warm-up (and compile) off the capture
            for _ in range(3):
                step(static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.inference_mode():  # the same step, not captured (compiled: inductor's kernels, not eager's)
            expected = [step(ids).logits for ids in inputs]
        if not compiled:
            assert all(torch.equal(e, r) for e, r in zip(expected, refs))
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), handle.cuda_graph(graph):
            out = step(static).logits
        for _ in range(2):
            for ids, want in zip(inputs, expected):
                static.copy_(ids)
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(out, want)
        with torch.inference_mode():  # eager after replays: the slots hold what the Python side thinks
            assert torch.equal(model(inputs[1]).logits, refs[1])
        assert handle.report().prefetch_misses == 0
    torch._dynamo.reset()


def test_gpu_capture_outside_cuda_graph_or_of_the_disk_tier_is_refused(tmp_path):
    dev = _cuda()
    model = tiny("llama").to(dev)
    ids = prompt().to(dev)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)):
        graph = torch.cuda.CUDAGraph()
        refused = pytest.raises(weightlift.OffloadError, match=r"handle\.cuda_graph")
        with refused, torch.inference_mode(), torch.cuda.graph(graph):
            model(ids)
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=2)
    handle = weightlift.offload(model, device=dev, config=config)
    with handle, pytest.raises(weightlift.OffloadError, match="disk tier"), handle.cuda_graph(torch.cuda.CUDAGraph()):
        pass


def test_gpu_capture_of_a_partial_step_is_refused():
    """A step that leaves the slots holding other layers than it found cannot be replayed twice."""
    from test_offload import Stack

    dev = _cuda()
    torch.manual_seed(0)
    model = Stack().eval().to(dev)
    x = torch.randn(4, 32, device=dev)
    with torch.inference_mode():
        ref = model(x)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=1)) as handle:
        with torch.inference_mode():
            model(x)
        model.order = [0, 1]  # a step that stops after two of six layers
        graph = torch.cuda.CUDAGraph()
        refused = pytest.raises(weightlift.OffloadError, match="do not replay")
        with refused, torch.inference_mode(), handle.cuda_graph(graph):
            model(x)
        model.order = list(range(6))
        with torch.inference_mode():  # the Python side still knows what the slots hold
            assert torch.equal(model(x), ref)


def _eight_layers_and_reference():
    """The device, an 8-layer tiny Llama back on the CPU, ids on the device, its resident output there."""
    dev = _device()
    model = tiny("llama", layers=8)
    ids = prompt().to(dev)
    model.to(dev)
    reference = run(model, ids)
    model.to("cpu")
    return dev, model, ids, reference


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_gpu_plan_respects_the_budget_and_stays_bitwise(tmp_path, fraction):
    import re

    dev, model, ids, (ref_logits, ref_tokens) = _eight_layers_and_reference()
    snap = snapshot(model)
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    with pytest.raises(weightlift.OffloadError, match="the smallest plan needs") as err:
        weightlift.plan(model, device=dev, budget=1, disk_path=tmp_path)
    smallest = int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))
    budget = smallest + int(fraction * (total - smallest))
    plan = weightlift.plan(model, device=dev, budget=budget, disk_path=tmp_path)
    assert plan.device_bytes <= budget
    assert (plan.offloaded == []) == (fraction == 1.0)
    torch.accelerator.synchronize()
    before = torch.accelerator.memory_allocated(dev)
    with weightlift.offload(model, plan=plan) as handle:
        logits, tokens = run(model, ids)
        report = handle.report()
        held = torch.accelerator.memory_allocated(dev) - before
    assert report.device_bytes == plan.device_bytes <= budget
    assert held >= report.pool_bytes
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert_same(model, snap)


def test_gpu_plan_sends_layers_to_disk_when_the_host_budget_is_short(tmp_path):
    dev, model, ids, (ref_logits, ref_tokens) = _eight_layers_and_reference()
    plan = weightlift.plan(model, device=dev, budget="300KiB", host_budget="600KiB", disk_path=tmp_path)
    # host RAM holds at most four layers of ~145 KiB: offloading the six or more this budget needs comes from disk
    assert plan.source == "disk" and plan.host_bytes <= 600 * 1024
    with weightlift.offload(model, plan=plan) as handle:
        logits, tokens = run(model, ids)
        assert handle.report().host_bytes <= 600 * 1024
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)


def _moe_and_reference():
    """The tiny Qwen3-MoE of test_experts, its prompt on the device, and its resident outputs there; the
    model is given back on the CPU, to be offloaded."""
    from test_experts import moe

    dev = _device()
    model = moe("qwen3_moe")
    ids = prompt().to(dev)
    model.to(dev)
    ref = run(model, ids)
    model.to("cpu")
    return dev, model, ids, ref


@pytest.mark.parametrize("source", ["host", "disk"])
@pytest.mark.parametrize("lookahead", [None, "previous"])
def test_gpu_moe_experts_stream_expert_by_expert(tmp_path, source, lookahead):
    from test_experts import EXPERTS, LAYERS, TOP_K, _poison_slots

    dev, model, ids, (ref_logits, ref_tokens) = _moe_and_reference()
    how = dict(source="disk", disk_path=tmp_path) if source == "disk" else {}
    config = OffloadConfig(prefetch_step=1, expert_lookahead=lookahead, **how)
    with weightlift.offload(model, device=dev, config=config) as handle:
        _poison_slots(handle)  # NaN everywhere an expert not moved would be read
        logits, tokens = run(model, ids)
        e = handle.report().experts
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert e.stacks == LAYERS and e.experts == LAYERS * EXPERTS and e.misses > 0 and TOP_K == 2


@pytest.mark.parametrize("source", ["host", "disk"])
def test_gpu_moe_expert_cache_is_bitwise_and_finds_repeated_experts(tmp_path, source):
    """The device expert cache on a real device: slots poisoned, a cache small enough to evict, bitwise."""
    from test_experts import _poison_slots

    dev, model, ids, (ref_logits, ref_tokens) = _moe_and_reference()
    how = dict(source="disk", disk_path=tmp_path) if source == "disk" else {}
    config = OffloadConfig(prefetch_step=1, expert_cache=12, expert_lookahead="previous", **how)
    with weightlift.offload(model, device=dev, config=config) as handle:
        assert handle.experts.cache.buffer.device.type == dev.type
        _poison_slots(handle)
        logits, tokens = run(model, ids)
        e = handle.report().experts
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert e.cached > 0 and e.evictions > 0


def test_gpu_two_ranks_offload_their_shards_over_nccl(tmp_path):
    """Tensor parallel on two GPUs (NCCL): each rank streams its DTensor shard, bitwise (tests/tp_worker.py)."""
    from test_distributed import _check_tiers, _torchrun

    _device()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two accelerators (CUDA devices) for NCCL")
    seen = _torchrun(tmp_path, 2, "llama,qwen3", "--cuda")
    assert [m["device"] for m in seen] == ["cuda:0", "cuda:1"]
    for family in ("llama", "qwen3"):
        _check_tiers(seen, family, 2)
