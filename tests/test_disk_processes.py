"""The disk tier's cache folder shared by processes that start together, die or are interrupted.

Each child is a fresh interpreter running `CHILD`: it builds a stack of plain torch blocks from a fixed seed
(`blocks`: no transformers import, so a child starts in seconds), offloads it to the disk tier and checks
its outputs against the same model resident (bitwise). Where a test needs a
child stopped at a given point of its cache write, the child says where it is on stdout and waits there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weightlift
from blocks import blocks, sample
from weightlift import OffloadConfig

CHILD = r"""
import json, os, signal, sys, time
# Ctrl-C raises KeyboardInterrupt, as under a terminal, also where this test runs in a background job (a shell
# starts those with SIGINT ignored, the children inherit it, and Python then leaves it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[1])
import torch
from blocks import blocks, same_state, sample, state
import weightlift, weightlift.disk as disk
from weightlift import OffloadConfig

folder, layers, stop, go = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
model, x = blocks(layers), sample()
with torch.inference_mode():
    ref = model(x)
writes = []
real_write, real_layers, real_replace = disk.write_cache, disk._write_layers, os.replace


def counted(*args, **kwargs):
    writes.append(1)
    return real_write(*args, **kwargs)


def stopped(point):
    print(point, flush=True)
    time.sleep(600)  # until the test kills or interrupts this process


def writer(f, layouts, placed, bar):
    if stop == "early":  # the header is written, no layer yet
        f.flush()
        stopped(stop)
    if stop == "slow":  # a write that takes long enough for every child to find no cache first
        time.sleep(1.0)

    class Bar:
        done = 0

        def update(self, n):
            bar.update(n)
            Bar.done += 1
            if stop == "middle" and Bar.done == len(layouts) // 2:
                f.flush()
                stopped(stop)

    return real_layers(f, layouts, placed, Bar())


def replace(a, b):
    if stop == "rename" and str(b).endswith(".safetensors"):  # written, fsynced, not renamed
        stopped(stop)
    return real_replace(a, b)


disk.write_cache, disk._write_layers, os.replace = counted, writer, replace
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
before = state(model)
config = OffloadConfig(source="disk", disk_path=folder, prefetch_step=1)
try:
    with weightlift.offload(model, device="cpu", config=config), torch.inference_mode():
        assert torch.equal(model(x), ref) and torch.equal(model(x), ref)
except KeyboardInterrupt:
    assert same_state(model, before)  # the model as it was
    left = sorted(p.name for p in os.scandir(folder) if ".tmp-" in p.name)
    print(json.dumps({"interrupted": True, "temporaries": left}), flush=True)
    sys.exit(0)
print(json.dumps({"writes": len(writes)}), flush=True)
"""

TESTS = str(Path(__file__).parent)


def _spawn(folder: Path, layers: int, stop: str, go: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, TESTS, str(folder), str(layers), stop, str(go)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _ready(child: subprocess.Popen) -> subprocess.Popen:
    assert child.stdout.readline().strip() == "ready", child.stderr.read()[-3000:]
    return child


def _start(folder: Path, layers: int, stop: str, go: Path) -> subprocess.Popen:
    return _ready(_spawn(folder, layers, stop, go))


def _finish(child: subprocess.Popen) -> dict:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_processes_starting_together_write_each_cache_once_and_all_read_it(tmp_path):
    """Two processes offload one model to one folder at the same moment, a third another model: each
    cache is written once (the second of a pair waits on its lock, then reuses it), every process's
    outputs are bitwise the resident model's, and nothing but the caches is left. Each write is held 1 s
    so that without the lock both of a pair would find no cache and write it."""
    go = tmp_path / "go"
    folder = tmp_path / "cache"
    children = [(layers, _spawn(folder, layers, "slow", go)) for layers in (3, 3, 4)]
    for _, child in children:
        _ready(child)
    go.touch()
    writes = {3: 0, 4: 0}
    for layers, child in children:
        writes[layers] += _finish(child)["writes"]
    assert writes == {3: 1, 4: 1}
    caches = [n for n in _names(folder) if n.endswith(".safetensors")]
    assert len(caches) == 2 and _names(folder) == sorted([*caches, *(f"{n}.used" for n in caches)])


@pytest.mark.parametrize("point", ["early", "middle", "rename"])
def test_a_write_killed_at_any_point_is_never_trusted_and_its_temporary_is_removed(tmp_path, point):
    """SIGKILL while the cache is written: after the header, halfway through the layers, or written and
    fsynced but not yet renamed. What it leaves is a temporary (and its lock file) only; the next offload
    writes a correct cache, removes the temporary, and leaves no lock behind."""
    go = tmp_path / "go"
    go.touch()
    folder = tmp_path / "cache"
    child = _start(folder, 4, point, go)
    assert child.stdout.readline().strip() == point
    child.kill()
    child.wait()
    left = _names(folder)
    assert len(left) == 2 and ".tmp-" in left[1] and left[0].endswith(".lock"), left
    temporary = folder / left[1]
    assert temporary.stat().st_size > 0
    model, x = blocks(4), sample()
    with torch.inference_mode():
        ref = model(x)
    config = OffloadConfig(source="disk", disk_path=str(folder), prefetch_step=1)
    with weightlift.offload(model, device="cpu", config=config), torch.inference_mode():
        assert torch.equal(model(x), ref) and torch.equal(model(x), ref)
    (cache,) = [n for n in _names(folder) if n.endswith(".safetensors")]
    assert _names(folder) == [cache, f"{cache}.used"]


def test_ctrl_c_while_the_cache_is_written_reaches_the_caller_and_leaves_nothing(tmp_path):
    """SIGINT halfway through the write: KeyboardInterrupt reaches the caller, the model is bitwise and
    storage for storage as it was, and the folder holds no temporary and no lock."""
    go = tmp_path / "go"
    go.touch()
    folder = tmp_path / "cache"
    child = _start(folder, 4, "middle", go)
    assert child.stdout.readline().strip() == "middle"
    child.send_signal(signal.SIGINT)
    assert _finish(child) == {"interrupted": True, "temporaries": []}  # within _finish's timeout: not slept out
    assert _names(folder) == []
