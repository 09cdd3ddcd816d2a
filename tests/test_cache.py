"""`weightlift.cache` and `weightlift cache list/clear`: what is in the cache folder, and removing only that."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import weightlift
from conftest import tiny
from weightlift import OffloadConfig, OffloadError, cache
from weightlift.cli import main

DAY = 86400


def _write(model, folder: Path) -> Path:
    """The model's layer cache in ``folder`` (every layer), written by offloading it once."""
    before = set(folder.glob("weightlift-*.safetensors"))
    with weightlift.offload(model, device="cpu", config=OffloadConfig(source="disk", disk_path=str(folder))):
        pass
    (path,) = set(folder.glob("weightlift-*.safetensors")) - before
    return path


def _converted(folder: Path, name: str, source: str, fmt: str = "weightlift-converted") -> Path:
    out = folder / "converted" / name
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / "weightlift.json").write_text(json.dumps({"format": fmt, "source": source, "dtype": "bfloat16",
                                                     "created": "2025-01-01T00:00:00"}))  # fmt: skip
    return out


def _foreign(folder: Path) -> list[Path]:
    """Files and folders that look like weightlift's but are not: never listed, never removed."""
    save_file({"x": torch.zeros(3)}, str(folder / "model.safetensors"))
    save_file({"x": torch.zeros(3)}, str(folder / "weightlift-mine.safetensors"), metadata={"format": "pt"})
    (folder / "weightlift-notes.safetensors").write_text("not even safetensors")
    young = folder / ".weightlift-0123.safetensors.tmp-99"  # a write in progress, whatever it holds
    young.write_bytes(b"\0" * 64)
    plain = folder / "converted" / "unmarked"
    plain.mkdir(parents=True)
    (plain / "model.safetensors").write_bytes(b"\0" * 10)
    other = _converted(folder, "other-tool", "x.gguf", fmt="someone-else")
    return [folder / "model.safetensors", folder / "weightlift-mine.safetensors",
            folder / "weightlift-notes.safetensors", young, plain, other]  # fmt: skip


def _age(path: Path, days: float) -> None:
    """Make ``path``'s last use ``days`` ago (its `.used` sidecar, created if missing)."""
    marker = path / ".used" if path.is_dir() else path.with_name(path.name + ".used")
    marker.touch()
    then = time.time() - days * DAY
    os.utime(marker, (then, then))


def test_list_shows_layer_caches_and_converted_models_with_sizes(tmp_path, capsys):
    path = _write(tiny("llama"), tmp_path)
    converted = _converted(tmp_path, "smollm2-bf16", "/models/SmolLM2-135M.Q4_1.gguf")
    foreign = _foreign(tmp_path)
    _age(converted, 3)
    found = cache.entries(tmp_path)
    assert [(e.path, e.kind, e.model, e.dtype) for e in found] == [  # oldest use first
        (converted, "converted model", "SmolLM2-135M.Q4_1.gguf", "bfloat16"),
        (path, "layer cache", "LlamaForCausalLM", "float32"),
    ]
    assert found[1].size == path.stat().st_size > 5 * 128 * 64 * 4 * 3  # every layer's MLP, at least
    assert found[0].size == 1000 + (converted / "weightlift.json").stat().st_size
    assert abs(found[0].last_used.timestamp() - (time.time() - 3 * DAY)) < 60
    assert abs(found[1].last_used.timestamp() - time.time()) < 60  # offload touched its sidecar just now
    assert not {e.path for e in found} & set(foreign)

    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "kind", "model", "dtype", "size", "last", "use"]
    assert table[1].startswith(str(Path("converted") / "smollm2-bf16")) and "converted model" in table[1]
    assert table[2].startswith(path.name) and "LlamaForCausalLM" in table[2] and "float32" in table[2]
    assert table[-1].startswith(f"total: {weightlift.config.format_size(found[0].size + found[1].size)} in 2 entries")
    assert main(["cache", "list", "--json", "--cache-dir", str(tmp_path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["path"] for e in listed["entries"]] == [str(converted), str(path)]
    assert listed["total_bytes"] == found[0].size + found[1].size and listed["entries"][1]["size"] == found[1].size
    assert all(p.exists() for p in foreign)


def test_clear_by_model_and_by_age_removes_only_those(tmp_path, capsys):
    llama, gpt2 = _write(tiny("llama", layers=2), tmp_path), _write(tiny("gpt2", layers=2), tmp_path)
    converted = _converted(tmp_path, "qwen-int8", "qwen.gguf")
    died = tmp_path / f".{llama.name}.tmp-123"  # a write that died two days ago: weightlift's, removable
    shutil.copy(llama, died)
    os.utime(died, (time.time() - 2 * DAY,) * 2)
    foreign = _foreign(tmp_path)
    for p in foreign[:4]:
        os.utime(p, (time.time() - 90 * DAY,) * 2)  # old, but not weightlift's (the young temp file too)
    _age(gpt2, 10)
    _age(converted, 1)

    removed = cache.clear(tmp_path, model="gpt2")  # case-insensitive substring of GPT2LMHeadModel
    assert [e.path for e in removed] == [gpt2] and not gpt2.exists()
    assert not gpt2.with_name(gpt2.name + ".used").exists()  # nor its sidecar
    assert llama.exists() and converted.exists()
    removed = cache.clear(tmp_path, older_than_days=0.5)
    assert {e.path for e in removed} == {converted, died} and llama.exists()
    assert cache.clear(tmp_path, model="Llama", older_than_days=5) == []  # used just now

    size = weightlift.config.format_size(llama.stat().st_size)
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"removed {llama.name} (layer cache, LlamaForCausalLM, {size})" in out and f"freed {size} (1 entry)" in out
    assert not llama.exists() and cache.entries(tmp_path) == []
    assert all(p.exists() for p in foreign)  # foreign files and folders are all still there
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_bad_ages_are_refused(tmp_path, capsys):
    with pytest.raises(OffloadError, match="`older_than_days` must be a number of days >= 0"):
        cache.clear(tmp_path, older_than_days=-1)
    assert main(["cache", "clear", "--older-than", "-2", "--cache-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("weightlift: error: `--older-than`=-2.0 must be")
    with pytest.raises(SystemExit) as exited:
        main(["cache", "clear", "--older-than", "soon"])
    assert exited.value.code == 2


def test_python_m_weightlift_cache_list_reads_weightlift_cache(tmp_path):
    path = _write(tiny("llama", layers=2), tmp_path)
    env = {**os.environ, "WEIGHTLIFT_CACHE": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "weightlift", "cache", "list", "--json"], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    listed = json.loads(out.stdout)
    assert listed["cache_dir"] == str(tmp_path) and [e["path"] for e in listed["entries"]] == [str(path)]
    assert listed["entries"][0]["model"] == "LlamaForCausalLM" and listed["total_bytes"] == path.stat().st_size


def test_a_model_in_another_dtype_gets_a_layer_cache_of_its_own(tmp_path):
    """The same weights in float32, bfloat16 and float16 (the last two of one size and layout: only the dtype
    tells them apart), offloaded from one folder: a file each, written once and left alone by the others;
    each run bitwise equal to its own model resident, and the float32 model's file reused as it is."""
    from conftest import assert_outputs_equal, prompt, run

    ids = prompt()
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=2)
    files: dict[torch.dtype, Path] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float32):
        model = tiny("llama").to(dtype)
        ref = run(model, ids, new_tokens=2)
        before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("weightlift-*.safetensors")}
        with weightlift.offload(model, device="cpu", config=config) as handle:
            out = run(model, ids, new_tokens=2)
            source = handle.report().source
        assert_outputs_equal(out, ref)
        after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("weightlift-*.safetensors")}
        assert {p: after[p] for p in before} == before  # every file already there: not written over
        if dtype in files:  # its own file again, as it was: nothing new
            assert after.keys() == before.keys() and source == f"{files[dtype]} (mapped)"
        else:
            (files[dtype],) = after.keys() - before.keys()
            assert source == f"{files[dtype]} (mapped)"
            meta = weightlift.disk.read_header(files[dtype])[0]["__metadata__"]
            assert meta["dtypes"] == str(dtype).removeprefix("torch.")
    assert len(set(files.values())) == 3


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_a_use_touches_the_sidecar_never_the_layer_cache(tmp_path, mapped):
    """Reusing a layer cache (and computing from it) moves its `<file>.used` sidecar's mtime to now, which is
    the last use `cache.entries` reports; the cache file keeps its bytes and its mtime."""
    from conftest import prompt

    model = tiny("llama")
    path = _write(model, tmp_path)
    _age(path, 10)
    sidecar = path.with_name(path.name + ".used")
    aged = sidecar.stat().st_mtime
    written, stamp = path.read_bytes(), path.stat().st_mtime_ns
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=2, mmap=mapped)
    with weightlift.offload(model, device="cpu", config=config), torch.inference_mode():
        model(prompt())
    assert sidecar.stat().st_mtime > aged + 9 * DAY and abs(sidecar.stat().st_mtime - time.time()) < 60
    (entry,) = cache.entries(tmp_path)
    assert entry.path == path and abs(entry.last_used.timestamp() - time.time()) < 60
    assert path.read_bytes() == written and path.stat().st_mtime_ns == stamp


def test_cache_clear_model_on_the_command_line_removes_that_models_entries(tmp_path, capsys):
    """`weightlift cache clear MODEL`: MODEL is a name to match, not a model path to check (it was refused as
    "neither 'smollm2', a .gguf file, nor a transformers model folder")."""
    llama, gpt2 = _write(tiny("llama", layers=2), tmp_path), _write(tiny("gpt2", layers=2), tmp_path)
    assert main(["cache", "clear", "gpt2", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"removed {gpt2.name} (layer cache, GPT2LMHeadModel" in out and "matching 'gpt2'" in out
    assert not gpt2.exists() and llama.exists()


def test_an_entry_that_cannot_be_removed_is_refused_naming_it_and_what_was_removed(tmp_path, monkeypatch, capsys):
    first = _converted(tmp_path, "a", "/models/a.gguf")
    second = _converted(tmp_path, "b", "/models/b.gguf")
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path) == second:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    order = [e.path for e in cache.entries(tmp_path)]
    before = order.index(second)
    with pytest.raises(OffloadError, match=rf"cannot remove `{second}`: Permission denied; check its permissions "
                                           rf"\({before} entries removed before it\)"):  # fmt: skip
        cache.clear(tmp_path)
    assert second.is_dir() and first.exists() == (order.index(first) > before)
    assert main(["cache", "clear", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"weightlift: error: cannot remove `{second}`: Permission denied") and err.count("\n") == 1
