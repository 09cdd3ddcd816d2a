"""Quantized weights stream in their quantized form and give the quantized model's outputs, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import weightlift
from conftest import assert_outputs_equal, assert_same, prompt, run, slot_bytes_by_hand, snapshot, tiny
from conftest import leaves as _leaves
from weightlift import OffloadConfig


def _quantized_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def _torchao(kind: str):
    def quantize(model):
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )

        config = {
            "int8": Int8WeightOnlyConfig(),
            "fp8": Float8WeightOnlyConfig(),
            "int4": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        }[kind]
        quantize_(_quantized_layers(model), config)

    return quantize


def _quanto(kind: str):
    def quantize(model):
        from optimum.quanto import freeze, qint4, qint8, quantize

        quantize(_quantized_layers(model), weights={"qint8": qint8, "qint4": qint4}[kind])
        freeze(_quantized_layers(model))

    return quantize


# quanto's qint4 matmul fails under torch.inference_mode even without weightlift ("Cannot set
# version_counter for inference tensor", optimum-quanto 0.2.7): run it under no_grad.
SUBCLASS_FORMATS = {
    "torchao-int8": ("torchao", _torchao("int8"), torch.inference_mode),
    "torchao-fp8": ("torchao", _torchao("fp8"), torch.inference_mode),
    "torchao-intx-int4": ("torchao", _torchao("int4"), torch.inference_mode),
    "quanto-qint8": ("optimum.quanto", _quanto("qint8"), torch.inference_mode),
    "quanto-qint4": ("optimum.quanto", _quanto("qint4"), torch.no_grad),
}


def _align(n: int) -> int:
    return (n + 511) // 512 * 512


@pytest.mark.parametrize("fmt", list(SUBCLASS_FORMATS))
def test_tensor_subclass_formats_stream_quantized_and_exact(fmt):
    package, quantize, mode = SUBCLASS_FORMATS[fmt]
    pytest.importorskip(package)
    model = tiny("llama")
    quantize(model)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert is_traceable_wrapper_subclass(weight)
    ids = prompt()
    ref_logits, ref_tokens = run(model, ids, mode=mode)
    snap = snapshot(model)
    ref_state = {k: [leaf.clone() for leaf in _leaves(v)] for k, v in model.state_dict().items()}
    slot = slot_bytes_by_hand(model.model.layers[0])
    quantized_bytes = sum(
        leaf.untyped_storage().nbytes()
        for _, t in (*model.model.layers.named_parameters(), *model.model.layers.named_buffers())
        for leaf in _leaves(t.detach())
    )
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        assert type(model.model.layers[0].mlp.up_proj.weight) is type(weight)
        logits, tokens = run(model, ids, mode=mode)
        report = handle.report()
        state = model.state_dict()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert report.prefetch_misses == 0
    assert (report.slots, report.slot_bytes, report.pool_bytes) == (3, slot, 3 * slot)
    assert report.offloaded_bytes == quantized_bytes  # quantized storage, not the dequantized size
    dense = sum(4 * p.numel() for p in tiny("llama").model.layers.parameters())
    assert report.offloaded_bytes < dense
    assert_same(model, snap)
    assert state.keys() == ref_state.keys()  # state_dict while offloaded held the true weights
    for key, leaves in ref_state.items():
        assert all(torch.equal(a, b) for a, b in zip(_leaves(state[key]), leaves, strict=True)), key


class Scaled(torch.Tensor):
    """A tensor subclass defined only here, never registered anywhere: int8 data times a scale."""

    @staticmethod
    def __new__(cls, qdata, scale):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=scale.dtype, device=qdata.device)

    def __init__(self, qdata, scale):
        self.qdata, self.scale = qdata, scale

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, ctx, outer_size, outer_stride):
        return cls(inner["qdata"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return Scaled(args[0].qdata.detach(), args[0].scale.detach())

        def unwrap(x):
            return x.qdata.to(x.scale.dtype) * x.scale if isinstance(x, Scaled) else x

        return func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))


def test_a_subclass_defined_only_in_this_test_streams():
    model = tiny("llama")
    for layer in model.model.layers:
        for lin in (layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj):
            w = lin.weight.detach()
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            q = torch.round(w / scale).to(torch.int8)
            lin.weight = nn.Parameter(Scaled(q, scale), requires_grad=False)
    ids = prompt()
    ref_logits, ref_tokens = run(model, ids)
    snap, slot = snapshot(model), slot_bytes_by_hand(model.model.layers[0])
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=3)) as handle:
        logits, tokens = run(model, ids)
        report = handle.report()
        entry = next(e for e in handle.layers[0].master.layout.entries if e.qualname == "mlp.up_proj.weight")
        assert entry.parts.kind == "subclass Scaled"
        assert [leaf.dtype for leaf in entry.specs] == [torch.int8, torch.float32]
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert (report.slots, report.slot_bytes, report.pool_bytes) == (5, slot, 5 * slot)  # step 3 of 5: 5 slots
    assert_same(model, snap)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_plain_fp8_weights(dtype):
    class Fp8Linear(nn.Module):
        def __init__(self, lin: nn.Linear):
            super().__init__()
            w = lin.weight.detach()
            self.scale = nn.Parameter(w.abs().amax() / 64, requires_grad=False)
            self.weight = nn.Parameter((w / self.scale).to(dtype), requires_grad=False)

        def forward(self, x):
            return x @ (self.weight.float() * self.scale).T

    model = tiny("llama")
    for layer in model.model.layers:
        layer.mlp.up_proj = Fp8Linear(layer.mlp.up_proj)
    ids = prompt()
    ref = run(model, ids)
    snap, slot = snapshot(model), slot_bytes_by_hand(model.model.layers[0])
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    assert (report.slots, report.slot_bytes, report.pool_bytes) == (3, slot, 3 * slot)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == dtype
    assert_same(model, snap)  # every tensor restored, fp8 bytes and scales


def test_mxfp4_style_packed_weights():
    """uint8 blocks of two e2m1 values with one float8_e8m0fnu scale per 32 values (MXFP4 layout)."""
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])

    class Mxfp4Linear(nn.Module):
        def __init__(self, out_f: int, in_f: int):
            super().__init__()
            codes = torch.randint(0, 16, (out_f, in_f))
            self.blocks = nn.Parameter((codes[:, ::2] | (codes[:, 1::2] << 4)).to(torch.uint8), requires_grad=False)
            exps = torch.randint(120, 130, (out_f, in_f // 32), dtype=torch.uint8)
            self.scales = nn.Parameter(exps.view(torch.float8_e8m0fnu), requires_grad=False)

        def forward(self, x):
            lo, hi = self.blocks & 0xF, self.blocks >> 4
            codes = torch.stack([lo, hi], dim=-1).flatten(-2).long()
            w = values[codes] * torch.exp2(self.scales.view(torch.uint8).float() - 127).repeat_interleave(32, -1)
            return x @ w.T

    model = tiny("llama")
    torch.manual_seed(3)
    for layer in model.model.layers:
        layer.mlp.gate_proj = Mxfp4Linear(128, 64)
    ids = prompt()
    ref = run(model, ids)
    snap, slot = snapshot(model), slot_bytes_by_hand(model.model.layers[0], "mlp")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2, params=("mlp",))) as handle:
        out = run(model, ids)
        report = handle.report()
        dtypes = {s.dtype for e in handle.layers[0].master.layout.entries for s in e.specs}
    assert_outputs_equal(out, ref)
    assert {torch.uint8, torch.float8_e8m0fnu} <= dtypes
    assert (report.slots, report.slot_bytes, report.pool_bytes) == (3, slot, 3 * slot)
    assert_same(model, snap)


def _replace_linears(model: nn.Module, make) -> None:
    for layer in model.model.layers:
        for child in list(layer.modules()):
            for attr, lin in list(child.named_children()):
                if type(lin) is nn.Linear:
                    setattr(child, attr, make(lin))


def _bnb4(quant_type: str, double: bool):
    def make(lin: nn.Linear) -> nn.Module:
        import bitsandbytes as bnb

        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=torch.float32, compress_statistics=double,
                                quant_type=quant_type)  # fmt: skip
        new.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False,
                                       compress_statistics=double, quant_type=quant_type)  # fmt: skip
        return new.to("cpu")

    return make


def _bnb8(lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
    new.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    return new.to("cpu")


def _hqq(bits: int):
    def make(lin: nn.Linear) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=bits, group_size=64)
        return HQQLinear(lin, quant_config=config, compute_dtype=torch.float32, device="cpu")

    return make


ATTRIBUTE_FORMATS = {
    "bnb-nf4": ("bitsandbytes", _bnb4("nf4", False)),
    "bnb-nf4-double": ("bitsandbytes", _bnb4("nf4", True)),
    "bnb-fp4": ("bitsandbytes", _bnb4("fp4", False)),
    "bnb-fp4-double": ("bitsandbytes", _bnb4("fp4", True)),
    "bnb-int8": ("bitsandbytes", _bnb8),
    "hqq-4bit": ("hqq", _hqq(4)),
    "hqq-8bit": ("hqq", _hqq(8)),
}


def _attribute_leaves(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor reachable from parameters, buffers and the quantization state objects, by path."""
    from weightlift.tensors import attribute_tensors

    out = {}
    for mname, m in model.named_modules():
        for name, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                out[f"{mname}.{name}"] = t.detach().clone()
                for path, a in attribute_tensors(t):
                    out[f"{mname}.{name}.{path}"] = a.clone()
        for path, a in attribute_tensors(m):
            out[f"{mname}.{path}"] = a.clone()
    return out


def _attribute_leaves_live(layer: nn.Module) -> list[torch.Tensor]:
    from weightlift.tensors import attribute_tensors

    out = []
    for m in layer.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                out += [t, *(a for _, a in attribute_tensors(t))]
        out += [a for _, a in attribute_tensors(m)]
    return out


@pytest.mark.parametrize("fmt", list(ATTRIBUTE_FORMATS))
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-first-forward"])
def test_formats_with_state_on_attributes_stream_quantized_and_exact(fmt, warm):
    package, make = ATTRIBUTE_FORMATS[fmt]
    pytest.importorskip(package)
    model = tiny("llama")
    _replace_linears(model, make)
    ids = prompt()
    if warm:  # formats may move or repack state on the first forward (bitsandbytes int8 does)
        run(model, ids, new_tokens=1)
    ref_logits, ref_tokens = run(model, ids)
    before = _attribute_leaves(model)
    types = {n: type(p) for n, p in model.named_parameters()}
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        logits, tokens = run(model, ids)
        report = handle.report()
        kinds = {e.parts.kind for layer in handle.layers for e in layer.master.layout.entries}
        state = model.state_dict()
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert report.prefetch_misses == 0
    after = _attribute_leaves(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {n: type(p) for n, p in model.named_parameters()} == types
    dense = sum(4 * p.numel() for p in tiny("llama").model.layers.parameters())
    assert report.offloaded_bytes < dense / 2  # quantized bytes travel, not dequantized ones
    # how each weight was taken apart: bitsandbytes' weights are Parameter subclasses over a plain storage
    # (their quantization state on attributes), HQQ's packed weight is a plain tensor; norms are plain
    wrapper = {"bnb-int8": "Int8Params", "hqq-4bit": None, "hqq-8bit": None}.get(fmt, "Params4bit")
    assert kinds == {"plain", *([f"storage subclass {wrapper}"] if wrapper else [])}
    # pool by hand: layer 0's distinct storages (weights and quantization state), each 512-aligned, 3 slots
    storages = {}
    for t in _attribute_leaves_live(model.model.layers[0]):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert report.slot_bytes == sum(_align(n) for n in storages.values())
    assert report.pool_bytes == 3 * report.slot_bytes
    resident_state = model.state_dict()
    assert state.keys() == resident_state.keys()
    for key, value in resident_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key


def _pack_int4(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack unsigned 4-bit values (0..15) eight to an int32 along ``dim``, lowest nibble first."""
    q = q.movedim(dim, -1).to(torch.int32)
    packed = torch.zeros(*q.shape[:-1], q.shape[-1] // 8, dtype=torch.int32)
    for k in range(8):
        packed |= q[..., k::8] << (4 * k)
    return packed.movedim(-1, dim).contiguous()


def _unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    p = packed.movedim(dim, -1)
    parts = [(p >> (4 * k)) & 0xF for k in range(8)]
    return torch.stack(parts, dim=-1).flatten(-2).movedim(-1, dim)


class PackedInt4Linear(nn.Module):
    """Faithful to how transformers holds GPTQ, AWQ and compressed-tensors pack-quantized layers after
    loading: the same tensor names, dtypes and packed shapes, with a dequantizing forward (group 32)."""

    def __init__(self, lin: nn.Linear, layout: str) -> None:
        super().__init__()
        self.layout, group = layout, 32
        w = lin.weight.detach()  # (out, in)
        out_f, in_f = w.shape
        g = w.reshape(out_f, in_f // group, group)
        scale = (g.amax(-1) - g.amin(-1)).clamp(min=1e-8) / 15
        zero = torch.round(-g.amin(-1) / scale).clamp(0, 15)
        q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15).reshape(out_f, in_f)
        if layout == "gptq":  # qweight (in/8, out) int32, qzeros (groups, out/8), scales fp16, g_idx
            self.register_buffer("qweight", _pack_int4(q.T, 0))
            self.register_buffer("qzeros", _pack_int4(zero.T.to(torch.int32), 1))
            self.register_buffer("scales", scale.T.to(torch.float16).contiguous())
            self.register_buffer("g_idx", torch.arange(in_f, dtype=torch.int32) // group)
        elif layout == "awq":  # qweight (in, out/8) int32, qzeros (groups, out/8), scales (groups, out) fp16
            self.register_buffer("qweight", _pack_int4(q.T, 1))
            self.register_buffer("qzeros", _pack_int4(zero.T.to(torch.int32), 1))
            self.register_buffer("scales", scale.T.to(torch.float16).contiguous())
        else:  # compressed-tensors pack_quantized: weight_packed (out, in/8) int32, weight_scale, weight_shape
            self.weight_packed = nn.Parameter(_pack_int4(q, 1), requires_grad=False)
            self.weight_scale = nn.Parameter(scale.to(torch.float16), requires_grad=False)
            self.weight_zero_point = nn.Parameter(zero.to(torch.int32), requires_grad=False)
            self.weight_shape = nn.Parameter(torch.tensor([out_f, in_f]), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        if self.layout == "compressed":
            out_f, in_f = self.weight_shape.tolist()
            q = _unpack_int4(self.weight_packed, 1).float()
            zero, scale = self.weight_zero_point.float(), self.weight_scale.float()
        else:
            q = _unpack_int4(self.qweight, 0 if self.layout == "gptq" else 1).T.float()
            zero, scale = _unpack_int4(self.qzeros, 1).T.float(), self.scales.T.float()
            out_f, in_f = q.shape
        g = q.reshape(out_f, in_f // 32, 32)
        return ((g - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)

    def forward(self, x):
        return x @ self.dequantized().T


@pytest.mark.parametrize("layout", ["gptq", "awq", "compressed"])
def test_packed_int4_layouts(layout):
    model = tiny("llama")
    _replace_linears(model, lambda lin: PackedInt4Linear(lin, layout))
    ids = prompt()
    ref = run(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_tensors = [*model.model.layers[0].parameters(), *model.model.layers[0].buffers()]
    slot = sum(_align(t.untyped_storage().nbytes()) for t in layer_tensors)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        out = run(model, ids)
        report = handle.report()
        dtypes = {s.dtype for e in handle.layers[0].master.layout.entries for s in e.specs}
    assert_outputs_equal(out, ref)
    assert torch.int32 in dtypes
    assert (report.slot_bytes, report.pool_bytes) == (slot, 3 * slot)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class GGUFParameter(nn.Parameter):
    """Like diffusers' GGUFParameter: raw GGUF blocks (uint8) in a Parameter subclass with its quant type."""

    def __new__(cls, data, quant_type):
        self = super().__new__(cls, data, requires_grad=False)
        self.quant_type = quant_type
        return self


class GGUFLinear(nn.Module):
    def __init__(self, lin: nn.Linear, quant_type) -> None:
        super().__init__()
        from gguf import quants

        self.shape = tuple(lin.weight.shape)
        blocks = quants.quantize(lin.weight.detach().numpy(), quant_type)
        self.weight = GGUFParameter(torch.from_numpy(blocks), quant_type)

    def forward(self, x):
        from gguf import quants

        w = quants.dequantize(self.weight.detach().cpu().numpy(), self.weight.quant_type)  # numpy: on the CPU
        return x @ torch.from_numpy(w.reshape(self.shape)).to(x.device, x.dtype).T


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_weights_stay_quantized(qtype):
    gguf = pytest.importorskip("gguf")
    quant_type = getattr(gguf.GGMLQuantizationType, qtype)
    model = tiny("llama")
    _replace_linears(model, lambda lin: GGUFLinear(lin, quant_type))
    ids = prompt()
    ref = run(model, ids)
    snap, slot = snapshot(model), slot_bytes_by_hand(model.model.layers[0])
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        w = model.model.layers[1].mlp.up_proj.weight
        assert type(w) is GGUFParameter and w.quant_type == quant_type and w.dtype == torch.uint8
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    assert (report.slots, report.slot_bytes, report.pool_bytes) == (3, slot, 3 * slot)
    assert_same(model, snap)
    assert type(model.model.layers[1].mlp.up_proj.weight) is GGUFParameter
    gguf_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())  # uint8 blocks + norms
    assert report.offloaded_bytes == gguf_bytes
