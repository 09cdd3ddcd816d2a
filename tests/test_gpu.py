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
        masters = [layer.master for layer in handle.layers]
        assert all(m.slab is not None and m.slab.is_pinned() for m in masters)
        assert report.host_bytes >= sum(m.layout.nbytes for m in masters)
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
        for key, (value, *_rest) in snap.items():
            if key in model.state_dict():
                assert torch.equal(model.state_dict()[key].to(dev), value)
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
        quantize_(model.model.layers, Int4WeightOnlyConfig(group_size=32) if fmt == "int4" else Int8WeightOnlyConfig())
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
