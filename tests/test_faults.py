"""Faults while a model runs: a read that fails or comes up short on the disk and checkpoint tiers, a file
replaced between forwards, and handles used from several threads.

Read faults are injected at the one call every file read goes through, ``os.preadv``: the next ``n``
calls fail (``EIO``) or return 0 bytes (a file cut short under the reader). On the mapped tiers a page
that cannot be read is a ``SIGBUS`` the kernel sends, which no Python code can turn into an error; those
tiers are not injected here (their file is checked for size and mtime before every layer instead).
"""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

import weightlift
from conftest import assert_same, hook_counts, prompt, snapshot, tiny
from weightlift import OffloadConfig, OffloadError
from weightlift.hooks import is_offloaded


class Faults:
    """Arms ``os.preadv``: the next ``count`` calls fail as ``how`` says (``count`` -1: every call)."""

    def __init__(self, monkeypatch, how: str) -> None:
        self.how, self.count, self.hit = how, 0, 0
        real = os.preadv

        def preadv(fd, buffers, offset):
            if self.count:
                self.count -= 1 if self.count > 0 else 0
                self.hit += 1
                if self.how == "eio":
                    raise OSError(errno.EIO, "Input/output error")
                return 0
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", preadv)


def _config(tier: str, folder, step: int) -> OffloadConfig:
    return OffloadConfig(source=tier, disk_path=str(folder), mmap=False, prefetch_step=step)


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


FAILED = {"eio": "cannot read .* Input/output error", "short": "ended while reading .* truncated"}


@pytest.mark.parametrize("tier,how,step", [("disk", "eio", 1), ("disk", "short", 0), ("checkpoint", "eio", 0),
                                           ("checkpoint", "short", 1)])  # fmt: skip
def test_a_failed_read_names_the_layer_and_file_and_the_next_forward_is_right(tmp_path, tier, how, step,
                                                                               monkeypatch):  # fmt: skip
    """A read fails once during a forward (synchronously, or on the copy thread ahead of its layer): that
    forward raises an `OffloadError` naming the layer and the file; the slot it was filling is not trusted,
    so the next forwards read it again and equal the resident model bitwise."""
    model, ids = tiny("llama"), prompt()
    ref = _logits(model, ids)
    if tier == "checkpoint":
        model.save_pretrained(tmp_path)
    faults = Faults(monkeypatch, how)
    with weightlift.offload(model, device="cpu", config=_config(tier, tmp_path, step)):
        assert torch.equal(_logits(model, ids), ref)
        faults.count = 1
        with pytest.raises(OffloadError, match=rf"`model\.layers\.\d` could not be loaded: .*{FAILED[how]}") as err:
            _logits(model, ids)
        assert str(tmp_path) in str(err.value) and faults.hit == 1
        for _ in range(2):
            assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("tier", ["disk", "checkpoint"])
def test_remove_while_the_file_cannot_be_read_leaves_the_model_offloaded_and_working(tmp_path, tier, monkeypatch):
    """remove() reads the weights back from the file first, before it changes anything: a read that fails
    there is an `OffloadError` that leaves the handle whole (hooks, slots, outputs); once the file reads
    again, remove() gives the model back bitwise, storage for storage."""
    model, ids = tiny("llama"), prompt()
    ref, hooks = _logits(model, ids), hook_counts(model)
    if tier == "checkpoint":
        model.save_pretrained(tmp_path)
    faults = Faults(monkeypatch, "eio")
    handle = weightlift.offload(model, device="cpu", config=_config(tier, tmp_path, 1))
    assert torch.equal(_logits(model, ids), ref)
    handle.engine.synchronize()  # the read ahead of the next forward has landed: only remove() reads from now on
    faults.count = -1
    with pytest.raises(OffloadError, match="cannot remove the offloading: the weights of `model.layers.0` could not "
                                           "be read back .* still offloaded and working"):  # fmt: skip
        handle.remove()
    faults.count = 0
    assert is_offloaded(model) and torch.equal(_logits(model, ids), ref)
    handle.remove()
    assert not is_offloaded(model) and hook_counts(model) == hooks
    assert torch.equal(_logits(model, ids), ref)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read-into-slots"])
def test_a_cache_renamed_over_between_forwards_is_never_read(tmp_path, mapped):
    """Another valid cache renamed onto the path (as a second process rewriting it for other weights
    does): this handle goes on reading the file it opened, so its answers stay its own model's; the next
    offload of this model finds the other weights' cache stale and rewrites it."""
    model, ids = tiny("llama"), prompt()
    ref = _logits(model, ids)
    other = tiny("llama", seed=1)  # the same shapes, other weights: the same cache name
    config = OffloadConfig(source="disk", disk_path=str(tmp_path / "a"), mmap=mapped, prefetch_step=1)
    with weightlift.offload(model, device="cpu", config=config):
        assert torch.equal(_logits(model, ids), ref)
        theirs_config = OffloadConfig(source="disk", disk_path=str(tmp_path / "b"))
        weightlift.offload(other, device="cpu", config=theirs_config).remove()
        (theirs,) = (tmp_path / "b").glob("*.safetensors")
        (mine,) = (tmp_path / "a").glob("*.safetensors")
        assert theirs.name == mine.name and theirs.read_bytes() != mine.read_bytes()
        os.replace(theirs, mine)
        for _ in range(2):
            assert torch.equal(_logits(model, ids), ref)
    with weightlift.offload(model, device="cpu", config=config):
        assert torch.equal(_logits(model, ids), ref)


def test_two_handles_in_two_threads_at_once_equal_each_alone(tmp_path):
    """Two models, each offloaded with its own handle (one from RAM, one from disk), run at the same time
    from two threads, many forwards each: every output equals that model's resident output bitwise."""
    pairs = []
    for seed, config in ((0, OffloadConfig(prefetch_step=1)), (1, _config("disk", tmp_path, 1))):
        model = tiny("llama", seed=seed)
        ids = prompt(seed=seed)
        pairs.append((model, ids, _logits(model, ids), config))
    handles = [weightlift.offload(m, device="cpu", config=c) for m, _, _, c in pairs]
    start, results = threading.Barrier(2), [[], []]

    def work(i):
        model, ids, ref, _ = pairs[i]
        start.wait()
        for _ in range(20):
            results[i].append(torch.equal(_logits(model, ids), ref))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.remove()
    assert results == [[True] * 20, [True] * 20]


def test_one_handle_used_from_two_threads_at_once_is_refused(monkeypatch):
    """A second thread entering the offloaded layers while a forward of another thread is inside them
    gets an `OffloadError` naming the fix (the slots hold one forward's layers at a time); the first
    forward is undisturbed and, after both, the model runs right from either thread."""
    model, ids = tiny("llama"), prompt()
    ref = _logits(model, ids)
    snap = snapshot(model)
    inside, go_on = threading.Event(), threading.Event()
    layer = model.model.layers[2]
    real = layer.forward

    def held(*args, **kwargs):  # the first thread stops inside layer 2 until the second has tried
        if threading.current_thread() is not threading.main_thread() and not go_on.is_set():
            inside.set()
            go_on.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", held)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)):
        first = []
        thread = threading.Thread(target=lambda: first.append(_logits(model, ids)))
        thread.start()
        inside.wait(30)
        with pytest.raises(OffloadError, match="used from two threads at once.*one handle per thread"):
            _logits(model, ids)
        go_on.set()
        thread.join()
        assert torch.equal(first[0], ref)
        assert torch.equal(_logits(model, ids), ref)
        other = []
        thread = threading.Thread(target=lambda: other.append(_logits(model, ids)))
        thread.start()
        thread.join()
        assert torch.equal(other[0], ref)
    monkeypatch.undo()
    assert_same(model, snap, same_storage=True)
