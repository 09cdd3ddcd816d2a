"""Streaming offloaded layers in place from a safetensors checkpoint folder (single file or sharded)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import weightlift
from conftest import (
    BIG_LLAMA,
    assert_outputs_equal,
    assert_refused,
    change_file,
    folder_files,
    measure_in_subprocess,
    prompt,
    run,
    tiny,
)
from weightlift import OffloadConfig, OffloadError
from weightlift.hf import load_streaming


def _ckpt(tmp_path, **kw) -> OffloadConfig:
    return OffloadConfig(source="checkpoint", disk_path=str(tmp_path), **{"prefetch_step": 2, **kw})


def _aligned_by_hand(folder) -> bool:
    """Whether every tensor of the layers sits where computing on it in place gives resident bits: a matrix
    at a 64-byte file offset, a vector at its element size (``checkpoint.alignment``), from the headers."""
    for path in folder.glob("*.safetensors"):
        entries, start = _parsed(path)
        for key, v in entries.items():
            if ".layers." in key or ".h." in key:
                need = 64 if len(v["shape"]) >= 2 else {"F32": 4, "BF16": 2, "F16": 2}[v["dtype"]]
                if (start + v["data_offsets"][0]) % need:
                    return False
    return True


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
@pytest.mark.parametrize("shard", ["200KB", "50MB"], ids=["sharded", "single-file"])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_checkpoint_in_memory_model_equals_resident(tmp_path, family, shard, mapped):
    """save_pretrained's files: mapped in place when every layer tensor is aligned for it, else (and with
    mmap=False) read into slots; bitwise either way, every decode step too."""
    model = tiny(family)
    ids = prompt()
    ref = run(model, ids)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard == "200KB")
    in_place = mapped and _aligned_by_hand(tmp_path)
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path, mmap=mapped)) as handle:
        out = run(model, ids)
        assert handle.report().source == str(tmp_path) + (" (mapped)" if in_place else "")
        assert handle.report().slots == (5 if in_place else 3)  # mapped: every layer stays mapped (RAM to spare)
    assert_outputs_equal(out, ref)
    assert torch.equal(run(model, ids)[0], ref[0])


@pytest.mark.parametrize("aligned", [True, False])
def test_a_checkpoint_written_aligned_is_computed_on_in_place(tmp_path, aligned):
    """`checkpoint.save_aligned` (what weightlift's conversions write) puts every tensor where it can be
    mapped; the same tensors at 4-byte offsets (`save_file` behind one 4-byte tensor) are read into slots.
    Bitwise both ways, each decode step included (at 4-byte offsets a mapped decode step was off by 6e-8)."""
    from safetensors.torch import load_file

    from weightlift.checkpoint import save_aligned

    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids)
    state = model.state_dict()
    if aligned:
        save_aligned(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    else:  # a 4-byte tensor first, sorting before every other key: everything after it 4 bytes off
        save_file({"a.pad": torch.zeros(1), **state}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert _aligned_by_hand(tmp_path) == aligned
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())  # a valid safetensors file
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path)) as handle:
        out = run(model, ids)
        assert handle.report().source == str(tmp_path) + (" (mapped)" if aligned else "")
    assert_outputs_equal(out, ref)


MOE = ["mixtral", "qwen3_moe"]


@pytest.mark.parametrize("family", MOE)
def test_moe_checkpoint_streams_through_transformers_conversions(tmp_path, family):
    """save_pretrained (like hub checkpoints) holds one tensor per expert under the original names
    (Mixtral's `block_sparse_moe.experts.E.w1`): each fused `experts.gate_up_proj` is read from its 2E
    per-expert tensors (`down_proj` from E), a renamed one (`mlp.gate`) from its key; both for a model in
    memory and for `load_streaming`, which reads the resident tensors through the same index."""
    model = tiny(family, layers=3)
    ids = prompt()
    ref = run(model, ids, new_tokens=3)
    model.save_pretrained(tmp_path, max_shard_size="200KB")  # experts spread over several files
    keys = {k for f in tmp_path.glob("*.safetensors") for k in _header(f)}
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys  # the fused tensors are not saved
    assert any(".experts.3." in k for k in keys) and (family == "mixtral") == any("block_sparse" in k for k in keys)
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path)) as handle:
        out = run(model, ids, new_tokens=3)
        assert handle.report().source == str(tmp_path)  # tensors of several pieces: read into slots, not mapped
    assert_outputs_equal(out, ref)

    streamed, handle = load_streaming(tmp_path, config=OffloadConfig(group_size=3, num_in_group=2))
    with handle:
        out = run(streamed, ids, new_tokens=3)
    assert_outputs_equal(out, ref)
    stack = streamed.model.layers
    assert all(p.is_meta for i in range(1, 3) for p in stack[i].parameters())  # never materialised
    want = model.state_dict()
    kept = {n: t for n, t in streamed.state_dict().items() if not t.is_meta}
    assert "model.layers.0.mlp.experts.gate_up_proj" in kept and "model.layers.0.mlp.gate.weight" in kept
    assert len(kept) == len(want) - sum(len(list(stack[i].parameters())) for i in range(1, 3))
    assert all(torch.equal(t, want[n]) for n, t in kept.items())


def test_moe_checkpoint_of_the_fused_tensors_is_read_by_name(tmp_path):
    model = tiny("mixtral", layers=3)
    ids = prompt()
    with torch.inference_mode():
        ref = model(ids).logits
    weightlift.checkpoint.save_aligned(model.state_dict(), tmp_path / "model.safetensors")
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path)) as handle, torch.inference_mode():
        assert torch.equal(model(ids).logits, ref)
        assert handle.report().source == str(tmp_path) + " (mapped)"  # one piece each: computed on in place


def _header(path) -> dict:
    """A safetensors file's tensor entries, parsed here (not by weightlift)."""
    return _parsed(path)[0]


def _parsed(path) -> tuple[dict, int]:
    """Its tensor entries and the file offset its data starts at."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
    return {k: v for k, v in entries.items() if k != "__metadata__"}, 8 + n


def test_moe_checkpoint_missing_an_expert_is_refused_naming_it(tmp_path):
    model = tiny("mixtral")
    model.save_pretrained(tmp_path)
    gone = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    _rewrite_header(tmp_path / "model.safetensors", lambda h: h.update({"renamed": h.pop(gone)}))
    _refused(model, tmp_path, f"`{gone}` is not in the checkpoint .*stacks 4 of them into "
                              r"`model.layers.0.mlp.experts.gate_up_proj`.*source='disk'")  # fmt: skip
    files = folder_files(tmp_path)
    with pytest.raises(OffloadError, match=f"`{gone}` is not in the checkpoint"):
        load_streaming(tmp_path, config=OffloadConfig(group_size=5, num_in_group=4))  # layer 0 resident: read too
    assert folder_files(tmp_path) == files  # (no model to leave: it built none)


def test_moe_checkpoint_expert_of_another_shape_is_refused_naming_it(tmp_path):
    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path)
    bad = "model.layers.1.mlp.experts.2.down_proj.weight"
    _rewrite_header(tmp_path / "model.safetensors", lambda h: h[bad].update(shape=[32, 64]))
    _refused(model, tmp_path, rf"`{bad}` in .* is \(32, 64\), `model.layers.1.mlp.experts.0.down_proj.weight` .*"
                              r"is \(64, 32\).*source='disk'")  # fmt: skip


def test_conversions_that_move_bytes_are_refused_naming_the_operation():
    """Only a stacking/concatenation/chunking in which each source stays one contiguous run is read in
    place: a transpose, or a concatenation that interleaves rows, is refused (with transformers' own ops)."""
    from transformers.core_model_loading import Concatenate, Transpose, WeightConverter

    from weightlift.conversion import Recipe, build

    shapes = {"a.q": (4, 6), "a.k": (4, 6)}

    def stored(key):
        return torch.float32, shapes[key], "model.safetensors"

    fused = WeightConverter(["q", "k"], "qk", operations=[Concatenate(dim=0)])
    built = build(Recipe("a.qk", fused, "qk", {"q": ["a.q"], "k": ["a.k"]}), stored, (8, 6))
    assert built.shape == (8, 6) and built.runs == [("a.q", 0, 96, 0), ("a.k", 0, 96, 96)]
    side = WeightConverter(["q", "k"], "qk", operations=[Concatenate(dim=1)])
    with pytest.raises(OffloadError, match=r"`a.qk`: transformers' Concatenate\(dim=1\) interleaves .*source='disk'"):
        build(Recipe("a.qk", side, "qk", {"q": ["a.q"], "k": ["a.k"]}), stored, (4, 12))
    turned = WeightConverter("q", "p", operations=[Transpose(0, 1)])
    with pytest.raises(OffloadError, match=r"`a.p` is made from the checkpoint's `a.q` by transformers' Transpose.*"
                                           r"source='disk'"):  # fmt: skip
        build(Recipe("a.p", turned, "p", {"q": ["a.q"]}), stored, (6, 4))


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3", "opt"])
def test_load_streaming_never_materialises_offloaded_layers(tmp_path, family):
    model = tiny(family)
    ids = prompt()
    ref = run(model, ids)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    streamed, handle = load_streaming(tmp_path, config=OffloadConfig(group_size=5, num_in_group=4, prefetch_step=2))
    with handle:
        out = run(streamed, ids)
        assert handle.report().layers_offloaded == 4
    assert_outputs_equal(out, ref)
    stack = streamed.model.decoder.layers if family == "opt" else streamed.model.layers
    assert all(p.is_meta for i in range(1, 5) for p in stack[i].parameters())  # given back as it was
    assert not any(p.is_meta for p in stack[0].parameters())


class Fp8Linear(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        w = lin.weight.detach()
        self.scale = nn.Parameter(w.abs().amax() / 64, requires_grad=False)
        self.weight = nn.Parameter((w / self.scale).to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x):
        return x @ (self.weight.float() * self.scale).T


@pytest.mark.parametrize("fmt", ["gptq", "fp8"])
def test_quantized_checkpoints_stream_in_place(tmp_path, fmt):
    from test_quantized import PackedInt4Linear, _replace_linears

    model = tiny("llama")
    _replace_linears(model, (lambda lin: PackedInt4Linear(lin, "gptq")) if fmt == "gptq" else Fp8Linear)
    ids = prompt()
    ref = run(model, ids)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path)) as handle:
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    assert report.offloaded_bytes < sum(4 * p.numel() for p in tiny("llama").model.layers.parameters()) / 2


def _refused(model, tmp_path, match):
    assert_refused(model, tmp_path, _ckpt(tmp_path), match)


def _saved(tmp_path):
    model = tiny("llama")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    return model, tmp_path / "model.safetensors"


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    path.write_bytes(raw[:8] + body + b" " * (n - len(body)) + raw[8 + n :])


def test_tensor_missing(tmp_path):
    model, path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h.update({"renamed": h.pop("model.layers.2.mlp.up_proj.weight")}))
    _refused(model, tmp_path, "`model.layers.2.mlp.up_proj.weight` is not in the checkpoint")


def test_dtype_or_shape_differs(tmp_path):
    model, path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h["model.layers.1.mlp.up_proj.weight"].update(shape=[64, 128]))
    _refused(model, tmp_path, r"`model.layers.1.mlp.up_proj.weight` in .* is F32 \(64, 128\), the model's is "
                              r"torch.float32 \(128, 64\)")  # fmt: skip
    model.half()
    save_file(tiny("llama").state_dict(), str(path))
    _refused(model, tmp_path, r"is F32 .*the model's is torch.float16")


def test_truncated_shard(tmp_path):
    model, path = _saved(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    _refused(model, tmp_path, "is truncated")


def test_corrupt_header(tmp_path):
    model, path = _saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[12:16] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(raw))
    _refused(model, tmp_path, "corrupt header.*checkpoint is damaged")


def test_model_changed_after_loading(tmp_path):
    model, _ = _saved(tmp_path)
    with torch.no_grad():
        model.model.layers[4].self_attn.o_proj.weight.add_(1)
    _refused(model, tmp_path, "`self_attn.o_proj.weight` of layer 4 differs from the checkpoint")


def test_folder_without_a_checkpoint(tmp_path):
    _refused(tiny("llama"), tmp_path, "holds no safetensors checkpoint")


def test_quantized_subclass_is_sent_to_the_layer_cache(tmp_path):
    pytest.importorskip("torchao")
    from test_quantized import SUBCLASS_FORMATS

    model, _ = _saved(tmp_path)
    SUBCLASS_FORMATS["torchao-int8"][1](model)
    _refused(model, tmp_path, "is a subclass Int8Tensor.*source='disk'")


@pytest.mark.parametrize("how", ["append", "rewrite"])
def test_checkpoint_changed_after_setup(tmp_path, how):
    model, path = _saved(tmp_path)
    ids = prompt()
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path, prefetch_step=1)):
        run(model, ids, new_tokens=1)
        change_file(path, how)
        with pytest.raises(OffloadError, match="changed after setup"), torch.inference_mode():
            for _ in range(3):
                model(ids)


CHILD = """
base = reset_peak()
config = weightlift.OffloadConfig(prefetch_step=2, host_budget=int(sys.argv[2]))
model, handle = weightlift.hf.load_streaming(sys.argv[1], config=config)
with torch.inference_mode():
    logits = model(torch.load(sys.argv[3])).logits
report = handle.report()
peak = status("VmHWM")
torch.save(logits, sys.argv[4])
print(peak - base, report.offloaded_bytes, report.pool_bytes, report.resident_bytes)
"""


def test_load_streaming_peak_rss_stays_near_resident_plus_budget(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**BIG_LLAMA)).eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        ref = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="50MB")
    layer_bytes = sum(4 * p.numel() for p in model.model.layers[0].parameters())
    budget = 2 * layer_bytes + 2 * 2**20  # two slots, with alignment padding
    torch.save(ids, tmp_path / "ids.pt")
    del model
    grown, offloaded, pool, resident = measure_in_subprocess(
        CHILD, tmp_path / "ckpt", budget, tmp_path / "ids.pt", tmp_path / "logits.pt"
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)
    assert offloaded >= 4 * budget and pool <= budget
    # its pool with half again as margin, plus 16 MiB as in test_disk (seen: 20.4 MiB with a 13 MiB mapped window;
    # 33.9 MiB reading into a 26 MiB pool, save_pretrained's tensors not being 64-byte aligned)
    assert grown < resident + 1.5 * pool + 16 * 2**20, (grown, offloaded, pool, resident)
    print(
        f"peak RSS growth {grown / 2**20:.1f} MiB; offloaded {offloaded / 2**20:.1f} MiB, pool {pool / 2**20:.1f} MiB"
    )


def test_weights_in_device_memory_are_compared_with_the_checkpoint_on_the_cpu(tmp_path):
    """A model already on an accelerator: each weight comes to the host to be compared with the file's bytes
    (a comparison across devices would raise), and a weight that differs is still caught."""
    from test_disk import OnDevice, _layer_layouts
    from weightlift.checkpoint import CheckpointFiles, CheckpointIndex

    model = tiny("llama", layers=3)
    model.save_pretrained(tmp_path)
    layouts = _layer_layouts(model)
    names = [f"model.layers.{i}" for i in layouts]
    OnDevice.host_copies, OnDevice.most_alive = [], 0
    checkpoint = CheckpointFiles.open(CheckpointIndex(tmp_path), names, layouts)
    try:
        entries = [e for layout in layouts.values() for e in layout.entries]
        for e in entries:
            e.parts.leaves = [OnDevice(leaf) for leaf in e.parts.leaves]
        checkpoint.check_equal(layouts)
        assert len(OnDevice.host_copies) == len(entries)  # each weight once,
        assert OnDevice.most_alive == 1  # one at a time
        changed = layouts[1].entries[0]
        (leaf,) = changed.parts.leaves
        changed.parts.leaves = [OnDevice(leaf.elem + 1)]
        with pytest.raises(OffloadError, match=f"`{changed.qualname}` of layer 1 differs from the checkpoint"):
            checkpoint.check_equal(layouts)
    finally:
        checkpoint.close()
        OnDevice.host_copies, OnDevice.most_alive = [], 0


def _save_with_one_tensor_shifted(state: dict, path, shifted: str, shift: int) -> int:
    """A safetensors file written here byte by byte: data from a 64-byte file offset, every tensor at the next
    64-byte offset except ``shifted``, ``shift`` bytes past one (``pad.<k>`` uint8 tensors fill the gaps: the
    format allows no holes). Returns ``shifted``'s file offset."""
    entries, chunks, position = {}, [], 0
    for key, t in state.items():
        want = -(-position // 64) * 64 + (shift if key == shifted else 0)
        if want > position:
            pad = {"dtype": "U8", "shape": [want - position], "data_offsets": [position, want]}
            entries[f"pad.{len(entries)}"] = pad
            chunks.append(bytes(want - position))
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype]
        entries[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [want, want + len(data)]}
        chunks.append(data)
        position = want + len(data)
    body = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 64)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + b"".join(chunks))
    return 8 + len(body) + entries[shifted]["data_offsets"][0]


@pytest.mark.parametrize(
    "dtype,shift,in_place",
    [(torch.float32, 2, False), (torch.float32, 4, True), (torch.bfloat16, 1, False), (torch.bfloat16, 2, True)],
    ids=["float32-at-2-read", "float32-at-4-mapped", "bfloat16-at-1-read", "bfloat16-at-2-mapped"],
)  # fmt: skip
def test_a_vector_maps_at_its_element_size_and_is_read_into_a_slot_off_it(tmp_path, dtype, shift, in_place):
    """One norm weight of an offloaded layer at a file offset that is ``shift`` past a 64-byte one, every other
    tensor at a 64-byte offset: at a multiple of its element size the file is mapped and the vector is computed
    on in its mapping, at that very offset; off it, the layers are read into slots and it lives in its slot.
    Bitwise equal to resident either way."""
    from safetensors.torch import load_file

    from test_disk import _mappings_of

    model = tiny("llama").to(dtype)
    ids = prompt()
    ref = run(model, ids)
    name = "model.layers.2.input_layernorm.weight"
    path = tmp_path / "model.safetensors"
    offset = _save_with_one_tensor_shifted(model.state_dict(), path, name, shift)
    assert offset % 64 == shift and offset % dtype.itemsize == (0 if in_place else shift)
    assert _aligned_by_hand(tmp_path) == in_place
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # a valid safetensors file
    del loaded
    assert _mappings_of(path) == []
    with weightlift.offload(model, device="cpu", config=_ckpt(tmp_path)) as handle:
        out = run(model, ids)
        report = handle.report()
        ptr = model.model.layers[2].input_layernorm.weight.data_ptr()
        maps = _mappings_of(path)
        slots = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in handle.pool.slots]
    assert_outputs_equal(out, ref)
    assert report.source == str(tmp_path) + (" (mapped)" if in_place else "")
    if in_place:  # in the file's mapping, at the tensor's own offset; no pool
        assert any(start <= ptr < end and ptr - start + at == offset for start, end, _, at in maps), (ptr, maps)
        assert slots == []
    else:  # in a slot of the pool; the file is not mapped at all
        assert any(lo <= ptr < hi for lo, hi in slots) and maps == []


def test_a_storage_subclass_is_sent_to_the_layer_cache(tmp_path):
    """A tensor subclass that is not a plain tensor in the model (here one over its own storage) may be stored
    otherwise in a checkpoint: refused naming it and source='disk' (no torchao needed, unlike the test above)."""

    class Tagged(torch.Tensor):
        pass

    model, _ = _saved(tmp_path)
    up = model.model.layers[3].mlp.up_proj
    up.weight = nn.Parameter(up.weight.detach().as_subclass(Tagged), requires_grad=False)
    _refused(model, tmp_path, r"`model\.layers\.3\.mlp\.up_proj\.weight` is a storage subclass Tagged, which "
                              r"checkpoints store under other names.*source='disk'")  # fmt: skip


def test_a_tensor_not_contiguous_in_the_model_is_sent_to_the_layer_cache(tmp_path):
    """A transposed view (same shape and bytes, other strides) cannot be filled from the file's row-major bytes
    in place: refused naming it and source='disk'."""
    model, _ = _saved(tmp_path)
    up = model.model.layers[1].mlp.up_proj
    up.weight = nn.Parameter(up.weight.detach().t().contiguous().t(), requires_grad=False)
    _refused(model, tmp_path, r"`model\.layers\.1\.mlp\.up_proj\.weight` is not contiguous in the model: use "
                              r"source='disk'")  # fmt: skip


def test_a_dtype_torch_cannot_hold_is_refused_naming_the_tensor_and_its_dtype(tmp_path):
    """A checkpoint dtype outside torch's (here `F4`) for an offloaded tensor: refused naming key, file and dtype."""
    model, path = _saved(tmp_path)
    _rewrite_header(path, lambda h: h["model.layers.2.mlp.up_proj.weight"].update(dtype="F4"))
    _refused(model, tmp_path, r"`model\.layers\.2\.mlp\.up_proj\.weight` in `[^`]*model\.safetensors` is F4 "
                              r"\(128, 64\), the model's is torch\.float32")  # fmt: skip


@pytest.mark.parametrize("index", ['{"metadata": {}}', "not json", '["model.safetensors"]'])
def test_an_index_without_a_weight_map_is_refused_naming_it(tmp_path, index):
    model, _ = _saved(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    _refused(model, tmp_path, r"`[^`]*model\.safetensors\.index\.json` is not a safetensors index \(no weight_map\)"
                              r".*checkpoint is damaged")  # fmt: skip


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused_naming_both(tmp_path):
    """The index sends a layer's tensor to a shard that does not hold it (a shard replaced by another
    download, say): refused naming the tensor and the shard, before anything moves."""
    model = tiny("llama")
    state = model.state_dict()
    layer = {k: v for k, v in state.items() if k.startswith("model.layers.")}
    save_file(layer, str(tmp_path / "layers.safetensors"))
    save_file({k: v for k, v in state.items() if k not in layer}, str(tmp_path / "rest.safetensors"))
    weight_map = {k: "layers.safetensors" if k in layer else "rest.safetensors" for k in state}
    weight_map["model.layers.3.mlp.up_proj.weight"] = "rest.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _refused(model, tmp_path, r"`model\.layers\.3\.mlp\.up_proj\.weight` is missing from `[^`]*rest\.safetensors` "
                              r"\(the index names it\)")  # fmt: skip


def test_conversions_of_a_checkpoint_that_does_not_fit_are_refused_naming_the_tensor():
    """Sources transformers would join that cannot be read in place as one tensor (with its own ops): of two
    dtypes, a dtype torch lacks, shapes that do not join, a source pattern missing, an expert missing from a
    stack, a split that does not divide. Each names the tensor and file and sends to source='disk'."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, WeightConverter

    from weightlift.conversion import Recipe, build

    shapes = {"a.v": (4, 5), "a.w": (5, 6)}
    dtypes = {"a.h": torch.float16, "a.x": None}

    def stored(key):
        return dtypes.get(key, torch.float32), shapes.get(key, (4, 6)), "model.safetensors"

    qk = WeightConverter(["q", "k"], "qk", operations=[Concatenate(dim=0)])
    stack = WeightConverter("experts.*.w", "experts.w", operations=[MergeModulelist(dim=0)])
    cases = [
        (Recipe("a.qk", qk, "qk", {"q": ["a.q"], "k": ["a.h"]}), (8, 6),
         r"`a\.h` in `model\.safetensors` is torch\.float16, `a\.q` that transformers joins with it into `a\.qk` is "
         r"torch\.float32: the checkpoint is inconsistent"),
        (Recipe("a.qk", qk, "qk", {"q": ["a.q"], "k": ["a.x"]}), (8, 6),
         r"`a\.x` in `model\.safetensors` has a dtype torch cannot hold"),
        (Recipe("a.qk", qk, "qk", {"q": ["a.q"], "k": ["a.v"]}), (8, 6),
         r"`a\.v` in `model\.safetensors` is \(4, 5\), `a\.q` .* Concatenate\(dim=0\) joins with it into `a\.qk` is "
         r"\(4, 6\): the checkpoint does not fit the model"),
        (Recipe("a.qk", qk, "qk", {"q": ["a.q"]}), (8, 6),
         r"`a\.qk` is joined by transformers from checkpoint tensors named like `k` \(with `a\.q`\), and the "
         r"checkpoint has none: it is incomplete"),
        (Recipe("a.experts.w", stack, "experts.w", {"experts.*.w": ["a.experts.0.w", "a.experts.2.w"]}), (3, 4, 6),
         r"`a\.experts\.1\.w` is not in the checkpoint \(transformers stacks 3 of them into `a\.experts\.w`\)"),
        (Recipe("a.g", WeightConverter("w", ["g", "u"], operations=[Chunk(dim=0)]), "g", {"w": ["a.w"]}), (2, 6),
         r"`a\.g`: `a\.w` of shape \(5, 6\) does not split in 2 equal parts along dim 0 \(transformers' Chunk"),
    ]  # fmt: skip
    for recipe, shape, message in cases:
        with pytest.raises(OffloadError, match=message + r".*source='disk'"):
            build(recipe, stored, shape)


def _mapped_files() -> dict[str, list[tuple[int, int]]]:
    """The address ranges of each file this process maps (the kernel's /proc/self/maps)."""
    out: dict[str, list[tuple[int, int]]] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.setdefault(parts[5], []).append((lo, hi))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_the_input_embedding_stays_in_its_file_on_a_cpu(tmp_path, tied):
    """Streamed on a CPU, an untied input embedding is computed on in its checkpoint file: its bytes lie in
    the kernel's mapping of that file, no budget counts them (the report, and the plan's resident bytes), and
    the answer is the resident model's, bit for bit. A tied one (the head reads all of it every token) is
    read into memory as before."""
    import transformers as tf

    from weightlift.files import in_file
    from weightlift.plan import plan

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8192, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tied)  # fmt: skip
    model = tf.LlamaForCausalLM(config).eval()
    ref = run(model, prompt())
    model.save_pretrained(tmp_path)
    table = 8192 * 128 * 4
    streamed, handle = load_streaming(tmp_path, config=OffloadConfig(prefetch_step=1))
    try:
        weight = streamed.get_input_embeddings().weight
        inside = [(lo, hi) for path, ranges in _mapped_files().items() if path.endswith(".safetensors")
                  for lo, hi in ranges if lo <= weight.data_ptr() < hi]  # fmt: skip
        report = handle.report()
        assert_outputs_equal(run(streamed, prompt()), ref)
        if tied:
            assert not in_file(weight) and not inside and report.in_file_bytes == 0
            assert report.resident_bytes >= table
        else:
            assert in_file(weight) and inside, "the embedding is not in a mapping of the checkpoint"
            assert report.in_file_bytes == table and table <= report.resident_bytes < table + 4096  # head, norms
    finally:
        handle.remove()
    if not tied:
        from weightlift.hf import load_outside_layers

        skeleton, _, _ = load_outside_layers(tmp_path, cpu=True)
        made = plan(skeleton, device="cpu", budget="64MiB", checkpoint=tmp_path)
        assert made.resident_bytes < 2 * table  # the head (one table), the layers and the norms: not two tables
