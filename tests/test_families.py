"""Offloading every family `find_stacks` knows, several stacks at once included: bitwise equal outputs."""

from __future__ import annotations

import pytest
import torch

import weightlift
from conftest import assert_same, hook_counts, snapshot
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


@pytest.mark.parametrize("family", ["falcon", "llava"])
def test_generation_with_kv_cache_matches_resident(family):
    """Greedy generation of 8 tokens with the KV cache: the tokens and every decode step's logits, bitwise
    (Llava: the image's patches go through the offloaded vision tower on the prefill only)."""
    model, kwargs = build(family)
    model.eval()
    args = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                output_logits=True)  # fmt: skip
    kwargs = {**kwargs, "attention_mask": torch.ones_like(kwargs["input_ids"])}
    snap = snapshot(model)
    with torch.inference_mode():
        expected = model.generate(**kwargs, **args)
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
            got = model.generate(**kwargs, **args)
            report = handle.report()
    assert got.sequences.shape[1] == kwargs["input_ids"].shape[1] + 8
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.equal(torch.stack(got.logits), torch.stack(expected.logits))
    assert report.layers_offloaded == sum(n for _, n in STACKS[family])
    assert_same(model, snap)


def test_unet_slots_fit_the_largest_block_of_two_stacks():
    model, _ = build("unet")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        sizes = [layer.master.layout.nbytes for layer in handle.layers]
        assert len(set(sizes)) > 1 and handle.report().slot_bytes == max(sizes)


def _tiny_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline

    class TinyPipeline(DiffusionPipeline):
        """A text-free latent diffusion pipeline: UNet denoising loop, then the VAE decodes."""

        def __init__(self, unet, vae, scheduler):
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

        @torch.inference_mode()
        def __call__(self, latents, context, steps=3):
            self.scheduler.set_timesteps(steps)
            for t in self.scheduler.timesteps:
                noise = self.unet(latents, t, encoder_hidden_states=context, return_dict=False)[0]
                latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
            return self.vae.decode(latents, return_dict=False)[0]

    unet, kwargs = build("unet")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8).eval()  # fmt: skip
    return TinyPipeline(unet, vae, DDIMScheduler()), kwargs


def test_a_diffusers_pipeline_offloads_its_denoiser_and_gives_bitwise_images():
    pipe, kwargs = _tiny_pipeline()
    inputs = (kwargs["sample"], kwargs["encoder_hidden_states"])
    snap = snapshot(pipe.unet)
    expected = pipe(*inputs)
    with weightlift.offload(pipe, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        got = pipe(*inputs)
        report = handle.report()
    assert torch.equal(got, expected)
    assert report.stack == "down_blocks+up_blocks" and report.prefetch_misses == 0
    vae_bytes = sum(t.numel() * t.element_size() for t in (*pipe.vae.parameters(), *pipe.vae.buffers()))
    assert report.resident_bytes > vae_bytes  # the VAE counts as resident, with the UNet's resident parts
    assert_same(pipe.unet, snap)


def test_a_pipeline_takes_a_plan_made_for_its_denoiser_on_a_sample(tmp_path):
    pipe, kwargs = _tiny_pipeline()
    inputs = (kwargs["sample"], kwargs["encoder_hidden_states"])
    expected = pipe(*inputs)
    total = sum(t.numel() * t.element_size() for t in (*pipe.unet.parameters(), *pipe.unet.buffers()))
    plan = weightlift.plan(pipe.unet, device="cpu", budget=total * 9 // 10, sample=kwargs, disk_path=tmp_path, reps=2)
    assert plan.goal == "sample" and plan.offloaded and plan.device_bytes <= total * 9 // 10
    with weightlift.offload(pipe, plan=plan) as handle:
        got = pipe(*inputs)
        assert handle.report().layers_offloaded == len(plan.offloaded)
    assert torch.equal(got, expected)


def test_a_pipeline_without_a_denoiser_is_refused():
    pipe, _ = _tiny_pipeline()
    pipe.register_modules(unet=None)
    parts = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    assert parts
    snaps, hooks = {n: snapshot(m) for n, m in parts.items()}, {n: hook_counts(m) for n, m in parts.items()}
    with pytest.raises(weightlift.OffloadError, match="pipeline without a `transformer` or `unet`.*`vae`"):
        weightlift.offload(pipe, device="cpu")
    for name, part in parts.items():
        assert_same(part, snaps[name], same_storage=True)
        assert hook_counts(part) == hooks[name]
