"""Every quantized format of the CPU matrix (test_quantized.py), offloaded to the accelerator from the CPU:
outputs bitwise those of the model resident on the accelerator, and `remove()` gives it back on the CPU,
bitwise, with its types. Some layers stay resident (moved to the device and back as they are) and the
others are offloaded (streamed and restored), so both ways back are taken. A move back that fails is
refused before anything changes."""

from __future__ import annotations

import pytest
import torch

import weightlift
from conftest import assert_same, prompt, refused, run, snapshot, tiny
from test_quantized import ATTRIBUTE_FORMATS, SUBCLASS_FORMATS, GGUFLinear, _replace_linears
from weightlift import OffloadConfig

pytestmark = pytest.mark.gpu

# layer i is offloaded when i % 2 >= 1: layers 1 and 3 stream, 0, 2 and 4 stay resident on the device
CONFIG = OffloadConfig(group_size=2, num_in_group=1, prefetch_step=1)


def _replacing(make):
    return lambda model: _replace_linears(model, make)


def _gguf(qtype: str):
    def make(model):
        import gguf

        kind = getattr(gguf.GGMLQuantizationType, qtype)
        _replace_linears(model, lambda lin: GGUFLinear(lin, kind))

    return "gguf", make, torch.inference_mode


FORMATS = {
    **SUBCLASS_FORMATS,
    **{name: (package, _replacing(make), torch.inference_mode) for name, (package, make) in ATTRIBUTE_FORMATS.items()},
    "gguf-Q8_0": _gguf("Q8_0"),
    "gguf-Q4_0": _gguf("Q4_0"),
}  # fmt: skip


def _quantized(fmt: str):
    package, quantize, mode = FORMATS[fmt]
    pytest.importorskip(package)
    model = tiny("llama")
    quantize(model)
    run(model, prompt(), new_tokens=1, mode=mode)  # formats may repack on their first forward (bitsandbytes int8)
    return model, mode


def _all_to(model: torch.nn.Module, dev: torch.device) -> None:
    """``model.to(dev)``, and every tensor the modules keep in attributes (HQQ's ``meta`` dict, bitsandbytes'
    int8 ``state``), which ``to`` leaves where it was: the model resident on the device, for reference."""
    model.to(dev)

    def move(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            if obj.device != dev:
                obj.data = obj.data.to(dev)
        elif isinstance(obj, dict) and depth < 3:
            for v in obj.values():
                move(v, depth + 1)
        elif depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for v in vars(obj).values():
                move(v, depth + 1)

    for m in model.modules():
        for k, v in vars(m).items():
            if not k.startswith("_"):
                move(v)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gpu_each_quantized_format_streams_and_goes_back_to_the_cpu(fmt):
    dev = torch.accelerator.current_accelerator()
    model, mode = _quantized(fmt)
    ids = prompt()
    snap = snapshot(model)
    reference, _ = _quantized(fmt)  # the same model (same seed, same quantization), resident on the device
    _all_to(reference, dev)
    ref = run(reference, ids.to(dev), new_tokens=3, mode=mode)
    del reference
    types = {n: type(p) for n, p in model.named_parameters()}
    with weightlift.offload(model, device=dev, config=CONFIG) as handle:
        assert {n: type(p) for n, p in model.named_parameters()} == types
        out = run(model, ids.to(dev), new_tokens=3, mode=mode)
        report = handle.report()
    assert report.layers_offloaded == 2 and report.prefetch_misses == 0
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert_same(model, snap)  # back on the CPU, bitwise, each tensor of its type


def test_gpu_a_tensor_that_cannot_go_back_is_refused_before_anything_changes(monkeypatch):
    """torchao int8 (a tensor subclass moved by swapping): the copy back of one resident tensor fails, so
    `remove()` raises an OffloadError saying so and leaves the model offloaded, unchanged and working;
    once the failure is gone, `remove()` gives the model back on the CPU, bitwise."""
    import weightlift.hooks

    dev = torch.accelerator.current_accelerator()
    model, mode = _quantized("torchao-int8")
    ids = prompt().to(dev)
    snap = snapshot(model)
    real = weightlift.hooks.relocation
    calls = []

    def failing(tensor, device):
        calls.append(device)
        if len(calls) == 3:
            raise RuntimeError("injected: no memory for the copy back")
        return real(tensor, device)

    with weightlift.offload(model, device=dev, config=CONFIG) as handle:
        expected = run(model, ids, new_tokens=3, mode=mode)
        monkeypatch.setattr(weightlift.hooks, "relocation", failing)
        with refused(model, r"could not be moved back to `cpu` \(RuntimeError: injected"):
            handle.remove()
        assert not handle.removed and len(calls) == 3
        out = run(model, ids, new_tokens=3, mode=mode)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
        monkeypatch.setattr(weightlift.hooks, "relocation", real)
    assert_same(model, snap)
