"""The disk tier: bitwise equal to resident, bounded memory, and every bad file a clear error."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import weightlift
import weightlift.disk as disk
from conftest import (
    BIG_LLAMA,
    assert_outputs_equal,
    assert_refused,
    assert_same,
    change_file,
    hook_counts,
    measure_in_subprocess,
    prompt,
    refused,
    run,
    snapshot,
    tiny,
)
from weightlift import OffloadConfig, OffloadError


def _disk(tmp_path, **kw) -> OffloadConfig:
    return OffloadConfig(source="disk", disk_path=str(tmp_path), **{"prefetch_step": 2, **kw})


def _cache_file(folder: Path) -> Path:
    (found,) = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    return found


@pytest.mark.parametrize("family", ["llama", "gemma", "mixtral", "gpt2"])
@pytest.mark.parametrize("group,num,step", [(1, 1, 1), (1, 1, 3), (3, 2, 2)])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_disk_equals_resident(tmp_path, family, group, num, step, mapped):
    model = tiny(family)
    ids = prompt()
    ref = run(model, ids)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    config = _disk(tmp_path, group_size=group, num_in_group=num, prefetch_step=step, mmap=mapped)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        out = run(model, ids)
        report = handle.report()
        state = model.state_dict()
        slots = len(set(handle.prefetcher.schedule.slot_of))
    assert_outputs_equal(out, ref)
    assert report.source == str(_cache_file(tmp_path)) + (" (mapped)" if mapped else "") and report.host_bytes == 0
    # mapped: no pool is allocated; with RAM to spare every layer's pages stay mapped once it ran
    assert report.slots == (report.layers_offloaded if mapped else slots)
    assert report.prefetch_misses == 0
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())  # restored from disk
    assert hook_counts(model) == hook_counts(tiny(family))


def test_cache_is_a_valid_safetensors_file_with_page_aligned_layers(tmp_path):
    model = tiny("llama")
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)) as handle:
        path = _cache_file(tmp_path)
        layouts = [layer.master.layout for layer in handle.layers]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "weightlift-layer-cache"
        names = [k for k in f.keys() if k.startswith("layer.")]  # noqa: SIM118 (safe_open has no __iter__)
        assert sorted(names) == [f"layer.{i}" for i in range(5)]
        assert all(f.get_tensor(f"layer.{i}").numel() == layouts[i].nbytes for i in range(5))
    cache = disk.LayerCache.open(path)
    assert all(layer.offset % 4096 == 0 for layer in cache.layers.values())
    cache.close()
    # the bytes of layer 2's up_proj in the file are the model's
    entry = next(e for e in layouts[2].entries if e.qualname == "mlp.up_proj.weight")
    with safe_open(str(path), "pt") as f:
        raw = f.get_tensor("layer.2")
    weight = raw[entry.offsets[0] : entry.offsets[0] + 128 * 64 * 4].view(torch.float32).view(128, 64)
    assert torch.equal(weight, model.model.layers[2].mlp.up_proj.weight)


def test_cache_is_reused_and_rewritten_when_weights_change(tmp_path):
    model = tiny("llama")
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        pass
    path = _cache_file(tmp_path)
    stamp = path.stat().st_mtime_ns
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        pass
    assert path.stat().st_mtime_ns == stamp  # reused, not rewritten
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.mul_(2)  # same shapes, other weights
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        out = run(model, ids)
    assert torch.equal(out[0], ref[0])
    assert path.stat().st_mtime_ns != stamp


def test_every_plan_of_a_model_reads_its_one_cache_file(tmp_path, caplog):
    """Plans offloading other subsets of one model (other indices, a group rule) share one file holding
    every layer: written once, by the first, reused by the others, and outputs stay bitwise."""
    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids, new_tokens=2)
    configs = [_disk(tmp_path, indices=(1, 2, 3)), _disk(tmp_path, indices=(2, 3, 4), mmap=False),
               _disk(tmp_path, group_size=2, num_in_group=1, prefetch_step=1)]  # fmt: skip
    stamps = []
    for config in configs:
        with caplog.at_level("INFO", logger="weightlift.disk"), weightlift.offload(model, device="cpu", config=config):
            out = run(model, ids, new_tokens=2)
        assert_outputs_equal(out, ref)
        (path,) = tmp_path.glob("weightlift-*.safetensors")
        stamps.append(path.stat().st_mtime_ns)
    assert stamps == [stamps[0]] * 3  # written once, then reused
    written = [r for r in caplog.records if r.levelname == "WARNING" and r.name == "weightlift.disk"]
    assert len(written) == 1 and str(path) in written[0].message and "weightlift cache list" in written[0].message
    assert "745.00 KiB" in written[0].message  # the file's size
    assert sum("reusing layer cache" in r.message for r in caplog.records) == 2
    with safe_open(str(path), "pt") as f:
        assert sorted(k for k in f.keys() if k.startswith("layer.")) == [f"layer.{i}" for i in range(5)]  # noqa: SIM118
        meta = f.metadata()
    assert meta["model"] == "LlamaForCausalLM" and meta["dtypes"] == "float32" and meta["version"] == disk.VERSION
    assert path.with_name(path.name + ".used").exists()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2)  # a layer the next plan keeps resident: still reused
    ref = run(model, ids, new_tokens=2)
    with weightlift.offload(model, device="cpu", config=configs[1]):
        assert torch.equal(run(model, ids, new_tokens=2)[0], ref[0])
    assert path.stat().st_mtime_ns == stamps[0]
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path, indices=(0, 1))):  # now it is stale
        out = run(model, ids, new_tokens=2)
    assert_outputs_equal(out, ref)
    assert path.stat().st_mtime_ns != stamps[0] and len(list(tmp_path.glob("weightlift-*.safetensors"))) == 1
    cache = disk.LayerCache.open(path)  # the rewrite hashed every layer of the model as it is now
    layouts = _layer_layouts(model)
    assert {i: c.digest for i, c in cache.layers.items()} == {i: disk.layer_digest(v) for i, v in layouts.items()}
    cache.close()


def test_a_layer_that_cannot_travel_is_left_out_of_the_cache_when_not_offloaded(tmp_path):
    model = tiny("llama")
    model.model.layers[0].register_buffer("sparse", torch.eye(3).to_sparse())  # weightlift cannot stream it
    ids = prompt()
    ref = run(model, ids, new_tokens=1)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path, indices=(1, 2, 3, 4))):
        assert torch.equal(run(model, ids, new_tokens=1)[0], ref[0])
    cache = disk.LayerCache.open(_cache_file(tmp_path))
    assert sorted(cache.layers) == [1, 2, 3, 4]
    cache.close()


def test_a_cache_of_an_older_format_version_is_rewritten(tmp_path):
    model, path = _written(tmp_path)
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"version":"%s"' % disk.VERSION.encode())
    raw[at : at + 13] = b'"version":"0"'
    path.write_bytes(bytes(raw))
    with pytest.raises(OffloadError, match="format version 0, this weightlift reads"):
        disk.LayerCache.open(path)
    ids = prompt()
    ref = run(model, ids, new_tokens=1)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        assert torch.equal(run(model, ids, new_tokens=1)[0], ref[0])
    assert disk.read_header(path)[0]["__metadata__"]["version"] == disk.VERSION


@pytest.mark.parametrize("fmt", ["torchao-int8", "bnb-nf4-double"])
def test_quantized_formats_stream_from_disk(tmp_path, fmt):
    from test_quantized import ATTRIBUTE_FORMATS, SUBCLASS_FORMATS, _replace_linears

    model = tiny("llama")
    if fmt in SUBCLASS_FORMATS:
        package, quantize, _ = SUBCLASS_FORMATS[fmt]
        pytest.importorskip(package)
        quantize(model)
    else:
        package, make = ATTRIBUTE_FORMATS[fmt]
        pytest.importorskip(package)
        _replace_linears(model, make)
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)) as handle:
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    assert report.offloaded_bytes < sum(4 * p.numel() for p in tiny("llama").model.layers.parameters()) / 2


def test_meta_model_streams_from_a_written_cache(tmp_path):
    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        pass
    resident = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    with torch.device("meta"):
        fresh = tiny("llama")
    fresh.load_state_dict(resident, strict=False, assign=True)
    for name, buf in fresh.named_buffers():  # non-persistent buffers (rotary) are rebuilt, not loaded
        if buf.is_meta:
            owner, attr = fresh.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            owner._buffers[attr] = dict(model.named_buffers())[name].clone()
    assert all(p.is_meta for p in fresh.model.layers.parameters())
    with weightlift.offload(fresh, device="cpu", config=_disk(tmp_path)):
        out = run(fresh, ids)
    assert_outputs_equal(out, ref)
    assert all(p.is_meta for p in fresh.model.layers.parameters())  # given back as it was


def test_meta_model_without_a_cache_is_refused(tmp_path):
    with torch.device("meta"):
        model = tiny("llama")
    with refused(model, "meta device", tmp_path):
        weightlift.offload(model, device="cpu", config=_disk(tmp_path))


def _written(tmp_path) -> tuple[torch.nn.Module, Path]:
    model = tiny("llama")
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        pass
    return model, _cache_file(tmp_path)


def _refused(model, tmp_path, match):
    assert_refused(model, tmp_path, _disk(tmp_path), match)


def test_truncated_cache(tmp_path):
    model, path = _written(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 5000)
    _refused(model, tmp_path, r"weightlift-.*\.safetensors` is truncated")


def test_corrupt_header(tmp_path):
    model, path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[10:20] = b"\xff" * 10
    path.write_bytes(bytes(data))
    _refused(model, tmp_path, "corrupt header")


def test_tensor_missing_from_cache(tmp_path):
    model, path = _written(tmp_path)
    raw = path.read_bytes()
    (n,) = __import__("struct").unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["layer.3x"] = header.pop("layer.3")
    body = json.dumps(header).encode()
    body += b" " * (n - len(body))
    path.write_bytes(raw[:8] + body + raw[8 + n :])
    _refused(model, tmp_path, "no tensor 'layer.3'")


def test_cache_of_another_model_shape_or_dtype(tmp_path):
    model, path = _written(tmp_path)
    other = tiny("llama")
    other.model.layers[1].mlp.up_proj.weight.data = other.model.layers[1].mlp.up_proj.weight.data.double()
    # put the other model's cache under this model's file name: same name, other shapes
    with weightlift.offload(other, device="cpu", config=_disk(tmp_path / "other")):
        pass
    _cache_file(tmp_path / "other").replace(path)
    shutil.rmtree(tmp_path / "other")  # and its `.used` sidecar
    _refused(model, tmp_path, r"`mlp.up_proj.weight` of layer 1 in .* is float64 \(128, 64\), the model's is float32")


def test_cache_with_other_offsets_is_refused(tmp_path):
    model, path = _written(tmp_path)
    raw = path.read_bytes()
    (n,) = __import__("struct").unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["manifest"])
    manifest["2"][1][0][1][0][3] += 512  # layer 2's first tensor now claims another offset
    header["__metadata__"]["manifest"] = json.dumps(manifest)
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    path.write_bytes(raw[:8] + body + b" " * (n - len(body)) + raw[8 + n :])
    _refused(model, tmp_path, "layer 2 in .* is laid out unlike the model's")


def test_foreign_file_is_never_written_over(tmp_path):
    model, path = _written(tmp_path)
    save_file({"x": torch.zeros(3)}, str(path))
    _refused(model, tmp_path, "is not a weightlift layer cache.*never writes over it")


@pytest.mark.parametrize("how", ["append", "rewrite"])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_file_changed_after_setup(tmp_path, how, mapped):
    """Grown, or rewritten in place at the same size (only its mtime says so)."""
    model = tiny("llama")
    ids = prompt()
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path, prefetch_step=1, mmap=mapped)):
        run(model, ids, new_tokens=1)
        change_file(_cache_file(tmp_path), how)
        with pytest.raises(OffloadError, match="changed after setup"), torch.inference_mode():
            for _ in range(3):
                model(ids)


def test_cache_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = tiny("llama")
    with refused(model, "cannot write the layer cache.*`disk_path`", tmp_path):
        weightlift.offload(model, device="cpu", config=_disk(blocker / "cache"))


def test_no_write_permission(tmp_path, monkeypatch):
    real_open = open

    def deny(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).startswith(str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    model = tiny("llama")
    with refused(model, "cannot write the layer cache.*Permission denied", tmp_path):
        weightlift.offload(model, device="cpu", config=_disk(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_disk_full_leaves_no_cache_a_later_run_would_trust(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = disk._write_layers

    def full(f, layouts, placed, bar):
        class Full:
            def write(self, data):
                calls["n"] += 1
                if calls["n"] > 3:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return f.write(data)

        return real(Full(), layouts, placed, bar)

    monkeypatch.setattr(disk, "_write_layers", full)
    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids)  # before the failure
    with refused(model, "No space left on device", tmp_path):
        weightlift.offload(model, device="cpu", config=_disk(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the partial file was removed
    monkeypatch.undo()
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        assert_outputs_equal(run(model, ids), ref)


@pytest.mark.parametrize("mapped,minimum", [(False, 445440), (True, 148480)])
def test_host_budget_below_the_pool_states_the_minimum(tmp_path, mapped, minimum):
    model = tiny("llama")
    with refused(model, rf"`host_budget`=1000 bytes is below the {minimum} bytes", tmp_path):
        weightlift.offload(model, device="cpu", config=_disk(tmp_path, host_budget=1000, mmap=mapped))


def test_config_errors():
    with pytest.raises(OffloadError, match="`source`"):
        OffloadConfig(source="nvme")
    with pytest.raises(OffloadError, match="needs `disk_path`"):
        OffloadConfig(source="disk")
    with pytest.raises(OffloadError, match="`disk_path` is given but `source`='host'"):
        OffloadConfig(disk_path="/tmp/x")
    with pytest.raises(OffloadError, match="`host_budget`"):
        OffloadConfig(source="disk", disk_path="/tmp/x", host_budget="lots")


CHILD = """
from safetensors.torch import load_file
base = reset_peak()
with torch.device("meta"):
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{config})).eval()
model.load_state_dict(load_file(sys.argv[1]), strict=False, assign=True)
model.model.rotary_emb.inv_freq = model.model.rotary_emb.original_inv_freq = torch.load(sys.argv[2])
config = weightlift.OffloadConfig(source="disk", disk_path=sys.argv[3], prefetch_step=2, host_budget={budget},
                                  mmap={mapped})
with weightlift.offload(model, device="cpu", config=config) as handle:
    with torch.inference_mode():
        logits = model(torch.load(sys.argv[4])).logits
    report = handle.report()
peak = status("VmHWM")
torch.save(logits, sys.argv[5])
print(peak - base, report.offloaded_bytes, report.pool_bytes, report.resident_bytes)
"""


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_peak_rss_stays_near_resident_plus_budget(tmp_path, mapped):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**BIG_LLAMA)).eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        ref = model(ids).logits
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path / "cache", mmap=False)) as handle:
        slot = handle.report().slot_bytes
    budget = 2 * slot
    resident = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")}
    save_file(resident, str(tmp_path / "resident.safetensors"))
    torch.save(model.model.rotary_emb.inv_freq, tmp_path / "inv_freq.pt")
    torch.save(ids, tmp_path / "ids.pt")
    del model
    grown, offloaded, pool, resident_bytes = measure_in_subprocess(
        CHILD.format(config=BIG_LLAMA, budget=budget, mapped=mapped), tmp_path / "resident.safetensors",
        tmp_path / "inv_freq.pt", tmp_path / "cache", tmp_path / "ids.pt", tmp_path / "logits.pt",
    )  # fmt: skip
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ref)
    assert offloaded >= 4 * budget and pool <= budget
    # what it holds (resident weights, its one-layer window or two-slot pool) with half again as margin, plus
    # 16 MiB for activations, allocator and library state touched on the first forward (seen on a 2-core x86
    # box: 18.9 MiB growth mapped with a 13 MiB window, 31.9 MiB reading into a 26 MiB pool)
    assert grown < resident_bytes + 1.5 * pool + 16 * 2**20, (grown, offloaded, pool)
    assert grown < offloaded  # far below what holding the model would take
    print(f"peak RSS growth {grown / 2**20:.1f} MiB; offloaded {offloaded / 2**20:.1f} MiB, pool {pool / 2**20:.1f} "
          f"MiB, resident {resident_bytes / 2**20:.1f} MiB")  # fmt: skip


@pytest.mark.parametrize("source", ["disk", "checkpoint"])
@pytest.mark.parametrize("budget_slabs", [None, 1])
def test_staging_ring_path_on_cpu(tmp_path, monkeypatch, source, budget_slabs):
    """The accelerator path (disk -> staging ring -> slot), on the CPU through the simulated device, with
    copies and reads slower than compute (a slab refilled before its copy out has run is a hazard), then
    `remove()` while copies are in flight."""
    import simdevice

    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids)
    if source == "checkpoint":
        model.save_pretrained(tmp_path, max_shard_size="200KB")
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path, prefetch_step=3)) as handle:
        slot = handle.report().slot_bytes
    budget = None if budget_slabs is None else budget_slabs * slot + 100
    config = OffloadConfig(source=source, disk_path=str(tmp_path), prefetch_step=2, host_budget=budget)
    sim = simdevice.install(monkeypatch, copy_delay=0.004, compute_lag=0.001, read_delay=0.002)
    snap = snapshot(model)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        sim.watch(handle)
        out = run(model, ids)
        report = handle.report()
        assert len(handle.ring.slabs) == (budget_slabs or 2)
        with torch.inference_mode():
            model(ids)  # and leave: the copies for the next forward are on their way when remove() runs
    sim.assert_clean()
    sim.close()
    assert_outputs_equal(out, ref)
    assert report.prefetch_misses == 0
    assert report.host_bytes == (budget_slabs or 2) * report.slot_bytes  # the ring, nothing else
    assert_same(model, snap)
    assert torch.equal(run(model, ids)[0], ref[0])


def test_staging_ring_below_one_slab_states_the_minimum(tmp_path, monkeypatch):
    import simdevice

    simdevice.install(monkeypatch).close()  # offload takes the accelerator path, refused before any copy
    model = tiny("llama")
    with refused(model, r"below the 148480 bytes of one staging slab", tmp_path):
        weightlift.offload(model, device="cpu", config=_disk(tmp_path, host_budget=10_000_000 // 100))


class OnDevice(torch.Tensor):
    """Stands in, on a CPU-only machine, for a tensor in accelerator memory: it says it is on ``cuda:0`` and
    holds real bytes (``elem``) that every operation on it alone runs on, giving another `OnDevice`, like a
    kernel on the device. What a device tensor refuses, it refuses: mixing it with CPU tensors (a device
    mismatch) and ``.numpy()`` (torch refuses that for any subclass). Its bytes reach the host only by
    ``.to("cpu")`` (or ``.cpu()``), and each such host copy is recorded in ``host_copies`` (storage weakrefs),
    so a test can tell how many of them are alive at a time."""

    host_copies: ClassVar[list] = []
    most_alive: ClassVar[int] = 0

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            device="cuda:0",
        )  # fmt: skip

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves, tree_map

        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device") or "cuda").type == "cpu":
            out = func(args[0].elem, **kwargs)
            live = sum(not r.expired() for r in OnDevice.host_copies)
            OnDevice.host_copies.append(StorageWeakRef(out.untyped_storage()))
            OnDevice.most_alive = max(OnDevice.most_alive, live + 1)
            return out
        if any(type(t) is torch.Tensor for t in tree_leaves((args, kwargs))):
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! ({func})")  # fmt: skip
        args, kwargs = tree_map(lambda t: t.elem if isinstance(t, OnDevice) else t, (args, kwargs))
        out = func(*args, **kwargs)
        return tree_map(lambda t: OnDevice(t) if type(t) is torch.Tensor else t, out)


@pytest.fixture
def on_device():
    OnDevice.host_copies, OnDevice.most_alive = [], 0
    yield OnDevice
    OnDevice.host_copies, OnDevice.most_alive = [], 0


def test_the_on_device_stand_in_refuses_what_a_device_tensor_refuses(on_device):
    x = on_device(torch.arange(6, dtype=torch.float32))
    assert x.is_cuda and x.device == torch.device("cuda", 0) and not x.is_cpu
    with pytest.raises(RuntimeError):
        x.numpy()
    with pytest.raises(RuntimeError, match="same device"):
        torch.equal(x, torch.arange(6, dtype=torch.float32))
    y = x.reshape(2, 3).view(torch.uint8)  # views and kernels stay on the "device"
    assert type(y) is on_device and y.device == x.device
    host = x.to("cpu")
    assert type(host) is torch.Tensor and torch.equal(host, torch.arange(6, dtype=torch.float32))
    assert len(on_device.host_copies) == 1


@pytest.mark.parametrize(
    "t",
    [torch.arange(10, dtype=torch.uint8), torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 3).t(),
     torch.tensor(2.5, dtype=torch.float64), torch.zeros(0, dtype=torch.int32), torch.randn(5, requires_grad=True)],
    ids=["uint8", "bf16", "transposed", "0-dim", "empty", "requires-grad"],
)  # fmt: skip
def test_host_bytes_of_device_tensors_go_through_a_host_copy(on_device, t):
    want = t.detach().contiguous().reshape(-1).view(torch.uint8)
    assert bytes(disk.host_bytes(t)) == bytes(want.numpy())
    assert bytes(disk.host_bytes(on_device(t))) == bytes(want.numpy())
    assert len(on_device.host_copies) == 1  # only the device tensor was copied, once
    plain = torch.arange(8, dtype=torch.uint8)
    disk.host_bytes(plain)[3] = 99  # a contiguous CPU tensor is seen in place, not copied
    assert plain[3] == 99


def _layer_layouts(model) -> dict[int, disk.Layout]:
    from weightlift.storage import Entry
    from weightlift.tensors import take_apart

    return {
        i: disk.Layout.of([Entry(n, t, take_apart(n, t), t.device) for n, t in layer.named_parameters()])
        for i, layer in enumerate(model.model.layers)
    }


def test_cache_of_weights_in_device_memory_is_written_piece_by_piece(tmp_path, on_device):
    """A model already on an accelerator: its layers' bytes come to the host one piece at a time, for the
    digest and for the file, and the cache is byte for byte the one written from the same weights on the CPU."""
    model = tiny("llama", layers=3)
    layouts = _layer_layouts(model)
    digests = {i: disk.layer_digest(layout) for i, layout in layouts.items()}
    assert disk.write_cache(tmp_path / "cpu.safetensors", "model.layers", layouts) == digests  # hashed on the way
    assert not on_device.host_copies
    for layout in layouts.values():
        layout.sources = [on_device(s) for s in layout.sources]
    pieces = sum(len(layout.sources) for layout in layouts.values())
    assert {i: disk.layer_digest(layout) for i, layout in layouts.items()} == digests
    assert disk.write_cache(tmp_path / "device.safetensors", "model.layers", layouts) == digests
    assert (tmp_path / "device.safetensors").read_bytes() == (tmp_path / "cpu.safetensors").read_bytes()
    assert len(on_device.host_copies) == 2 * pieces  # each piece once for its digest, once for the file
    assert on_device.most_alive == 1  # never a second piece on the host at the same time


def _mappings_of(path) -> list[tuple[int, int, str, int]]:
    """``(start, end, perms, file offset)`` of each range of this process's memory mapping ``path``, read from
    /proc/self/maps."""
    want, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == want:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end, fields[1], int(fields[2], 16)))
    return out


def test_mapped_cache_is_private_and_a_write_into_a_layer_never_reaches_the_file(tmp_path, caplog):
    """On a CPU target the cache is mapped private (copy-on-write): an offloaded layer's weight points into
    that mapping, and writing into it changes this process's copy only; the file keeps its bytes and mtime,
    the weight given back by `remove()` is the file's, and the next offload reuses the file as it is."""
    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids, new_tokens=2)
    original = model.model.layers[2].mlp.up_proj.weight.detach().clone()
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)) as handle:
        path = _cache_file(tmp_path)
        before, stamp = path.read_bytes(), path.stat().st_mtime_ns
        maps = _mappings_of(path)
        assert maps and all(perms[3] == "p" for _, _, perms, _ in maps), maps  # private, never shared ("s")
        weight = model.model.layers[2].mlp.up_proj.weight
        assert any(start <= weight.data_ptr() < end for start, end, _, _ in maps)  # computed on in place
        assert handle.report().source == f"{path} (mapped)"
        with torch.no_grad():
            weight.add_(1.0)  # into the mapped pages themselves
        assert torch.equal(weight, original + 1.0)  # the write landed, in this process's copy of the page
        assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert torch.equal(model.model.layers[2].mlp.up_proj.weight, original)  # restored from the file's bytes
    config = _disk(tmp_path)
    with caplog.at_level("INFO", logger="weightlift.disk"), weightlift.offload(model, device="cpu", config=config):
        out = run(model, ids, new_tokens=2)
    assert any("reusing layer cache" in r.message for r in caplog.records)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stamp
    assert_outputs_equal(out, ref)


def test_read_into_slots_is_a_pread_per_layer_on_a_reader_thread_of_a_sequentially_advised_file(tmp_path, monkeypatch):
    """With mmap=False each offloaded layer's byte range of the cache (from the file's own safetensors header,
    parsed here) is read by ``preadv`` straight into its pool slot, on a thread other than the caller's, from a
    file descriptor advised ``POSIX_FADV_SEQUENTIAL``."""
    import ctypes
    import struct
    import threading

    calls, advised, recording = [], [], [True]
    real_preadv, real_fadvise = os.preadv, os.posix_fadvise

    def preadv(fd, buffers, offset, *args):
        if recording[0]:
            (buffer,) = buffers
            address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
            calls.append((os.readlink(f"/proc/self/fd/{fd}"), fd, offset, len(buffer), address,
                          threading.get_ident()))  # fmt: skip
        return real_preadv(fd, buffers, offset, *args)

    def posix_fadvise(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), fd, offset, length, advice))
        return real_fadvise(fd, offset, length, advice)

    model = tiny("llama")
    ids = prompt()
    ref = run(model, ids, new_tokens=2)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        pass  # the cache is written; what follows reads it
    path = _cache_file(tmp_path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    spans = {i: header[f"layer.{i}"]["data_offsets"] for i in range(5)}
    where = {i: (8 + n + begin, end - begin) for i, (begin, end) in spans.items()}  # (file offset, bytes)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", posix_fadvise)
    offloaded = (1, 3, 4)
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path, indices=offloaded, mmap=False)) as handle:
        out = run(model, ids, new_tokens=2)
        handle.prefetcher.settle()
        recording[0] = False
        slot_of = handle.prefetcher.schedule.slot_of
        slots = {i: handle.pool.slots[slot_of[p]].data_ptr() for p, i in enumerate(offloaded)}
    assert_outputs_equal(out, ref)
    target = os.path.realpath(path)
    reads = [c for c in calls if c[0] == target]
    assert reads and len(reads) == len(calls)  # nothing else was read through preadv meanwhile
    # each read is one whole offloaded layer, at its range in the file, into the start of that layer's slot
    layer_of = {where[i]: i for i in offloaded}
    assert all((offset, nbytes) in layer_of for _, _, offset, nbytes, _, _ in reads), (reads, where)
    assert {layer_of[(offset, nbytes)] for _, _, offset, nbytes, _, _ in reads} == set(offloaded)
    assert all(address == slots[layer_of[(offset, nbytes)]] for _, _, offset, nbytes, address, _ in reads)
    assert threading.main_thread().ident not in {thread for *_, thread in reads}  # a reader thread's
    fds = {fd for _, fd, *_ in reads}
    assert all((target, fd, 0, 0, os.POSIX_FADV_SEQUENTIAL) in advised for fd in fds), advised


def test_writing_the_cache_leaves_no_thread_behind(tmp_path):
    """tqdm starts a monitor thread the first time a bar of a class is made (shown or disabled) and never stops
    it (tqdm 4.70): writing a layer cache left that thread running after ``remove()`` (found by
    ``benchmarks/soak.py``). A monitor another test's bar started is stopped first, so that a new one shows."""
    from tqdm.auto import tqdm

    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None
    model = tiny("llama", layers=2)
    before = set(threading.enumerate())
    with weightlift.offload(model, device="cpu", config=_disk(tmp_path)):
        run(model, prompt(), new_tokens=1)
    assert list(tmp_path.glob("weightlift-*.safetensors")), "no cache was written"
    assert {t.name for t in set(threading.enumerate()) - before} == set()
