"""Offloading every family `find_stacks` knows, several stacks at once included: bitwise equal outputs."""

from __future__ import annotations

import pytest
import torch

import weightlift
from conftest import assert_same, snapshot
from families import FAMILIES, STACKS, build
from weightlift import OffloadConfig

NEW = [f for f in FAMILIES if f in ("falcon", "bert", "t5", "llava", "flux", "sd3", "unet")]


def _outputs(out) -> list[torch.Tensor]:
    """Every tensor of a model output (a tensor, a tuple, or a ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.to_tuple() if hasattr(out, "to_tuple") else out
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            found += [t for t in v if isinstance(t, torch.Tensor)]
    return found


@pytest.mark.parametrize("family", NEW)
@pytest.mark.parametrize("step", [1, 2])
def test_every_stack_offloaded_gives_bitwise_outputs(family, step):
    model, kwargs = build(family)
    snap = snapshot(model)
    with torch.inference_mode():
        expected = _outputs(model(**kwargs))
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=step)) as handle:
            got = _outputs(model(**kwargs))
            got_again = _outputs(model(**kwargs))
            report = handle.report()
    assert expected and len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(got_again, expected))
    assert report.layers == sum(n for _, n in STACKS[family]) == report.layers_offloaded
    assert report.stack == "+".join(path for path, _ in STACKS[family])
    assert_same(model, snap)


def test_t5_generation_with_both_stacks_offloaded_matches_resident():
    model, kwargs = build("t5")
    ids = kwargs["input_ids"]
    args = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        expected = model.generate(ids, **args)
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
            got = model.generate(ids, **args)
            report = handle.report()
    assert torch.equal(got, expected)
    # the encoder runs once, the decoder once per token: out-of-order layers load synchronously, counted
    assert report.prefetch_misses > 0


def test_unet_slots_fit_the_largest_block_of_two_stacks():
    model, _ = build("unet")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        sizes = [layer.master.layout.nbytes for layer in handle.layers]
        assert len(set(sizes)) > 1 and handle.report().slot_bytes == max(sizes)


def test_diffusers_pipeline_component_is_offloaded_in_place():
    """A pipeline's denoiser is an nn.Module: offload it where the pipeline holds it; outputs stay bitwise."""
    model, kwargs = build("flux")
    holder = torch.nn.Module()
    holder.transformer = model  # stands for pipe.transformer
    with torch.inference_mode():
        expected = _outputs(holder.transformer(**kwargs))
        with weightlift.offload(holder.transformer, device="cpu"):
            got = _outputs(holder.transformer(**kwargs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
