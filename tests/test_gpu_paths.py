"""The paths a GPU user takes beyond `offload()`: a checkpoint folder loaded streaming onto the accelerator
(with a budget, and with every layer offloaded), and the CLI's `generate` on it. Outputs equal the same
model resident on the accelerator, bit for bit; the CLI's answer equals its own answer on the CPU where the
accelerator computes as the CPU does (the fake one), and is checked for shape elsewhere."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import prompt, run, save_tokenizer, tiny
from weightlift import OffloadConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny("llama", layers=6).save_pretrained(path, max_shard_size="200KB")
    save_tokenizer(path, 100)
    return path


def _resident(folder, dev):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval().to(dev)
    return run(model, prompt().to(dev), new_tokens=4)


@pytest.mark.parametrize("how", ["every-layer", "budget"])
def test_gpu_load_streaming_a_folder_onto_the_device_equals_resident(folder, tmp_path, how):
    """`load_streaming` builds the model empty, reads what stays resident onto the device and streams the
    offloaded layers from the checkpoint files through pinned staging: bitwise the resident model. With a
    budget, device memory for weights stays within it (allocator figures, not the report)."""
    from weightlift.hf import load_streaming

    dev = torch.accelerator.current_accelerator()
    ref = _resident(folder, dev)
    torch.accelerator.synchronize()
    before = torch.accelerator.memory_allocated(dev)
    budget = 800 * 1024  # some of the six layers (160 KiB each) stay resident
    how_ = {"config": OffloadConfig(prefetch_step=2)} if how == "every-layer" else {"budget": budget}
    model, handle = load_streaming(folder, device=dev, **how_)
    with handle:
        torch.accelerator.synchronize()
        held = torch.accelerator.memory_allocated(dev) - before
        assert {p.device for p in model.parameters()} == {torch.device(dev.type, 0)}
        out = run(model, prompt().to(dev), new_tokens=4)
        report = handle.report()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    if how == "every-layer":
        assert report.layers_offloaded == 6
    else:
        assert 0 < report.layers_offloaded < 6
    assert report.prefetch_misses == 0, report
    assert held >= report.pool_bytes
    if how == "budget":
        assert held <= budget, (held, budget)


def test_gpu_the_cli_generates_on_the_device(folder, tmp_path, capsys):
    """`weightlift generate FOLDER --device <accelerator> --budget ...`: it plans for the device, streams,
    and answers; on the fake accelerator (which computes as the CPU does) the answer is the CPU's."""
    from weightlift.cli import main

    dev = torch.accelerator.current_accelerator()
    common = ["generate", str(folder), "--prompt", "w5 w6 w7", "--tokens", "4", "--budget", "600KiB",
              "--cache-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main([*common, "--device", dev.type]) == 0
    on_device = json.loads(capsys.readouterr().out)
    assert on_device["new_tokens"] == 4 and on_device["layers_offloaded"] > 0
    assert on_device["device"].startswith(dev.type) and on_device["weights_bytes"] <= 600 * 1024
    import fakeaccel

    if fakeaccel.enabled():
        assert main([*common, "--device", "cpu"]) == 0
        on_cpu = json.loads(capsys.readouterr().out)
        assert on_device["text"] == on_cpu["text"]
