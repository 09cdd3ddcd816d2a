"""The mapped tier's window (`weightlift.window`): layers stay mapped while RAM allows, nothing is asked of
the kernel for pages it holds, and a cold start recovers within the generation. Checked against the kernel's
counters (page faults, bytes read, the process's mapped file pages), not the report."""

from __future__ import annotations

import mmap
import resource
from pathlib import Path

import pytest
import torch

import weightlift
from weightlift import OffloadConfig
from weightlift.checkpoint import CheckpointMapping
from weightlift.window import CHECK_SECONDS, MappedWindow

SHAPE = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=4)  # fmt: skip


def test_the_window_keeps_the_first_layers_that_fit_beside_the_largest_streamed_one():
    assert MappedWindow.within([10] * 5, None).kept == set()  # no limit known: stream every layer
    window = MappedWindow.within([10] * 5, 30)
    assert window.kept == {0, 1} and window.nbytes == 30 and window.layers == 3
    assert MappedWindow.within([10] * 5, 29).kept == {0}  # 10 kept + 10 streamed; two kept would need 30
    everything = MappedWindow.within([10, 20, 10], 40)
    assert everything.kept == {0, 1, 2} and everything.nbytes == 40 and everything.layers == 3
    assert MappedWindow.within([10] * 5, 19).kept == set()  # one streamed layer: nothing more fits
    assert window.ran(0) and window.held == {0} and not window.ran(3)


def test_a_kept_layer_the_kernel_took_back_halves_the_kept_set():
    now = [0.0]
    window = MappedWindow.within([10] * 8, 1000, clock=lambda: now[0])
    for p in range(8):
        window.ran(p)
    in_cache = {p: 1.0 for p in range(8)}
    now[0] = CHECK_SECONDS
    assert window.pressed(in_cache.get) == [] and window.kept == set(range(8))  # all there: nothing given back
    in_cache[1] = 0.5  # the kernel took half of a kept layer's pages back
    now[0] += CHECK_SECONDS / 2
    assert window.pressed(in_cache.get) == []  # not checked again so soon
    now[0] += CHECK_SECONDS
    assert window.pressed(in_cache.get) == [4, 5, 6, 7]  # the check goes round the held layers: 1 now
    assert window.kept == {0, 1, 2, 3} and window.held == {0, 1, 2, 3} and window.nbytes == 50


def _model():
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE)).eval()


def _decode(model, tokens: int):
    """Prefill, then ``tokens`` greedy decode steps; yields after each step (the caller reads counters)."""
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids, use_cache=True)
    for _ in range(tokens):
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        yield out.logits


def _faults() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


@pytest.mark.parametrize("window", ["RAM to spare", "one layer"])
def test_warm_tokens_ask_nothing_of_the_kernel_for_pages_it_holds(tmp_path, window):
    """With RAM to spare every layer stays mapped: a warm decode token makes no read-ahead call, and no more
    page faults (the kernel's count) than the same steps of the resident model, and the process maps the
    whole file. With a window of one layer
    (``host_budget``), each layer is given back after it runs and faults in again from the page cache (that
    is what the window costs), but still no read-ahead is asked for pages the page cache holds."""
    model = _model()
    with torch.inference_mode():
        ref = list(_decode(model, 4))
        minor = _faults()[0]
        assert len(list(_decode(model, 4))) == 4
        resident_faults = (_faults()[0] - minor) / 5  # the activations' own, resident: the baseline
    layer_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    budget = None if window == "RAM to spare" else layer_bytes + (1 << 20)
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=1, host_budget=budget)
    with weightlift.offload(model, device="cpu", config=config) as handle, torch.inference_mode():
        offloaded = handle.report().offloaded_bytes
        mapped, rss_start = handle.cache.mapping.mapped, _rss_file()
        assert list(_decode(model, 1))  # a first pass: the pages fault in (the file is in the page cache)
        asked, (minor, major), rss_before = mapped.advice_calls.copy(), _faults(), _rss_file()
        steps = list(_decode(model, 4))
        (minor_after, major_after), rss = _faults(), _rss_file()
        report = handle.report()
    for out, expected in zip(steps, ref, strict=True):
        assert torch.equal(out, expected)  # bit for bit
    new = mapped.advice_calls - asked
    assert new[mmap.MADV_WILLNEED] == 0, new  # nothing read ahead: the page cache held every page
    faults = (minor_after - minor) / 5  # per forward: the prefill and 4 decode steps
    if window == "RAM to spare":
        assert report.slots == SHAPE["num_hidden_layers"] and report.pool_bytes >= offloaded
        assert faults <= resident_faults + 4, (faults, resident_faults)  # seen: 0 and 0 alone, 28 in a long run
        assert new[mmap.MADV_DONTNEED] == 0
        assert rss_before - rss_start >= 0.9 * offloaded  # the layers are mapped into this process and stay
    else:
        assert report.slots == 1 and report.pool_bytes < 2 * layer_bytes
        # each layer faults in again: at least one fault per 2 MiB (the kernel maps up to a folio around a fault;
        # seen: 207 per forward of 26 MiB, 128 KiB each)
        assert faults >= resident_faults + offloaded / (2 << 20), (faults, resident_faults)
        assert new[mmap.MADV_DONTNEED] > 0
        assert max(rss, rss_before) - rss_start < 2 * layer_bytes + (4 << 20)  # about the window, never the file
    assert major_after == major  # nothing came from the disk


def test_a_cold_start_reads_the_file_once_and_then_runs_from_memory(tmp_path, monkeypatch):
    """The page cache emptied after offload: the first pass reads the layers from disk (the kernel's
    read_bytes), and every token after it reads nothing and faults nothing in from disk."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench import evict  # the benchmarks' page-cache drop: every file under a folder

    model = _model()
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=1)
    with weightlift.offload(model, device="cpu", config=config) as handle, torch.inference_mode():
        offloaded = handle.report().offloaded_bytes
        evict(tmp_path)
        before = _read_bytes()
        steps = _decode(model, 4)
        next(steps)  # the prefill and one decode step: the cold start
        first, (_, major) = _read_bytes() - before, _faults()
        rest = list(steps)
        later, (_, major_after) = _read_bytes() - before - first, _faults()
    assert len(rest) == 3
    assert first >= 0.9 * offloaded, (first, offloaded)  # it was cold
    assert later == 0 and major_after == major, (later, major_after - major)


@pytest.mark.parametrize("source", ["checkpoint", "disk"])
def test_layers_read_into_slots_beyond_the_page_cache_are_handed_back_once_read(tmp_path, monkeypatch, source):
    """Read into slots (a checkpoint that cannot be mapped, or the layer cache with ``mmap=False``) with RAM
    for only two streamed layers: those two keep their pages, the others' pages are handed back once read
    (the kernel's ``mincore`` says so), and a decode token reads from the disk (``read_bytes``) the handed
    back layers and nothing more. With RAM to spare nothing is handed back and a token reads nothing."""
    import weightlift.apply as apply_module

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench import evict

    model = _model()
    with torch.inference_mode():
        ref = list(_decode(model, 3))
    layer_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    folder = tmp_path / "model"
    model.save_pretrained(folder)  # safetensors' own offsets: not aligned, so read into slots
    kw = dict(source="checkpoint", disk_path=str(folder)) if source == "checkpoint" else dict(
        source="disk", disk_path=str(tmp_path / "cache"), mmap=False)  # fmt: skip
    pool = 2 * layer_bytes  # prefetch_step=2 on a CPU: two slots
    for short in (True, False):
        if short:  # the RAM available: the slots, two layers kept and one read (no margin)
            monkeypatch.setattr(apply_module, "available_ram", lambda: pool + 3 * layer_bytes + 4096)
            monkeypatch.setattr(apply_module, "margin", lambda available: 0)
        else:
            monkeypatch.undo()
            monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2, **kw)) as handle, \
                torch.inference_mode():  # fmt: skip
            assert getattr(handle.cache, "mapping", None) is None  # read into slots
            assert handle.pool.nbytes == pool
            evict(folder if source == "checkpoint" else tmp_path / "cache")
            steps = _decode(model, 3)
            first = next(steps)  # the prefill and one decode step read every layer once
            before = _read_bytes()
            rest = list(steps)
            per_token = (_read_bytes() - before) / len(rest)
            mapping = CheckpointMapping(handle.cache) if source == "checkpoint" else handle.cache.map()
            cached = [mapping.cached(i) for i in range(SHAPE["num_hidden_layers"])]
            files = handle.cache.files if source == "checkpoint" else [handle.cache.file]
            drops = sum(f.drop_calls for f in files)
            mapping.close()
        for out, expected in zip([first, *rest], ref, strict=True):
            assert torch.equal(out, expected)  # bit for bit
        if short:
            assert min(cached[:2]) >= 0.9 and max(cached[2:]) <= 0.1, cached
            assert drops >= 6 * 3, drops  # six layers, each read by each forward
            assert 0.9 * 6 * layer_bytes <= per_token <= 1.1 * 6 * layer_bytes, (per_token, layer_bytes)
        else:
            assert min(cached) >= 0.9 and drops == 0, (cached, drops)
            assert per_token == 0
