"""What only an accelerator can show: copies overlapping compute in device time, CUDA graphs replayed right
after eager forwards (and after one that raised), a second device, device and pinned host memory figures,
the disk tier's staging ring under misses, and a quantized model under torch.compile.

Every test but the last one carries the ``gpu`` marker (conftest skips those without an accelerator; tests
that need CUDA itself skip with the reason on other accelerators). The marker is put on each test rather
than module-wide so that ``test_gpu_bench_measures_a_tiny_model_on_the_cpu`` can run everywhere: it runs
``benchmarks/gpu_bench.py``'s measuring code once on the CPU, so that `make gpu-check` does not meet its
first bug on the GPU machine. Outputs are compared bit for bit (``torch.equal``) with the same model
resident on the same device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import weightlift
from conftest import BIG_LLAMA, assert_same, prompt, run, snapshot, tiny
from test_offload import Block, Stack
from weightlift import OffloadConfig, OffloadError

gpu = pytest.mark.gpu
MiB = 2**20
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (streams, events, graphs, memory stats); this accelerator is not CUDA")
    return torch.device("cuda", torch.cuda.current_device())


def _stack(n: int = 6, dim: int = 32, block: type[Block] = Block, seed: int = 0) -> Stack:
    """`Stack` (tests/test_offload.py) with its layers of type ``block``."""
    torch.manual_seed(seed)
    model = Stack(n=n, dim=dim)
    model.layers = nn.ModuleList(block(dim) for _ in range(n))
    return model.eval()


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


class Flaky(Block):
    """A `Block` whose forward raises while ``fail`` is set (after its weights were waited for)."""

    fail = False

    def forward(self, x):
        if self.fail:
            raise RuntimeError("injected failure inside a layer")
        return super().forward(x)


class Sleepy(Block):
    """A `Block` that first keeps the compute stream busy for ``cycles`` GPU clock cycles."""

    cycles = 0

    def forward(self, x):
        torch.cuda._sleep(self.cycles)
        return super().forward(x)


def _event_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _trace(handle, path: Path) -> tuple[list, list]:
    """(compute, copy) complete events of ``handle.trace``: (layer, start us, end us); compute excludes waits."""
    handle.report()  # resolves the device timings recorded so far
    handle.trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    compute = [(e["name"], e["ts"], e["ts"] + e["dur"]) for e in events
               if e["tid"] == 1 and not e["name"].startswith("wait ")]  # fmt: skip
    copies = [(e["name"].removeprefix("copy "), e["ts"], e["ts"] + e["dur"]) for e in events
              if e["tid"] == 2 and e["name"].startswith("copy ")]  # fmt: skip
    return compute, copies


@gpu
def test_gpu_copies_run_concurrently_with_compute(tmp_path):
    """Six 8 MiB layers whose compute (a ``torch.cuda._sleep`` calibrated to one layer's plain copy time)
    is as long as their copy, every layer offloaded, prefetch_step=2. From the trace (device times): some
    layer's copy overlaps another layer's compute, and the second forward's device time (first layer
    start to last layer end) is shorter than its compute plus the copy time inside that window, which it
    could not be if copies and compute took turns. Each layer's compute interval covers its sleep, so the
    trace is device time and not the host's launch times."""
    dev = _cuda()
    dim, n = 1024, 6
    model = _stack(n, dim, Sleepy).to(dev)
    layer_bytes = 2 * (dim * dim + dim) * 4
    host = torch.empty(layer_bytes, dtype=torch.uint8, pin_memory=True)
    slot = torch.empty(layer_bytes, dtype=torch.uint8, device=dev)
    _event_ms(lambda: slot.copy_(host, non_blocking=True))
    copy_ms = min(_event_ms(lambda: slot.copy_(host, non_blocking=True)) for _ in range(3))
    _event_ms(lambda: torch.cuda._sleep(1000))
    ms_per_cycle = _event_ms(lambda: torch.cuda._sleep(1_000_000)) / 1_000_000
    Sleepy.cycles = max(10_000, int(copy_ms / ms_per_cycle))
    sleep_us = Sleepy.cycles * ms_per_cycle * 1e3
    x = torch.randn(8, dim, device=dev)
    try:
        ref = _forward(model, x)
        with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
            outs = [_forward(model, x) for _ in range(2)]
            torch.cuda.synchronize()
            compute, copies = _trace(handle, tmp_path / "stack.trace.json")
            misses = handle.report().prefetch_misses
    finally:
        Sleepy.cycles = 0
    assert all(torch.equal(o, ref) for o in outs) and misses == 0
    assert len(compute) >= 2 * n and copies, (len(compute), len(copies))
    overlaps = [(c, k) for c in copies for k in compute if c[0] != k[0] and min(c[2], k[2]) - max(c[1], k[1]) > 0]
    assert overlaps, "no copy overlapped another layer's compute"
    second = sorted(compute, key=lambda e: e[1])[-n:]
    assert all(end - start >= 0.8 * sleep_us for _, start, end in second), (second, sleep_us)
    w0, w1 = second[0][1], second[-1][2]
    copy_in_window = sum(max(0.0, min(end, w1) - max(start, w0)) for _, start, end in copies)
    compute_sum = sum(end - start for _, start, end in second)
    assert w1 - w0 < compute_sum + copy_in_window, (w1 - w0, compute_sum, copy_in_window)


def _capture(handle, model: nn.Module, static: torch.Tensor):
    """Warm-up on a side stream, then one captured step through ``handle.cuda_graph``: (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(side):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), handle.cuda_graph(graph):
        out = model(static)
    return graph, out


@gpu
def test_gpu_graph_replay_right_after_eager_forwards_and_after_an_exception():
    """A captured step replayed with plain ``graph.replay()`` right after an eager forward, with no
    synchronize in between, on the same stream, equals the resident output; an eager forward right after a
    replay too; and the same after an eager forward that raised inside a layer (its weights waited for, the
    copies ahead in flight), eager forwards after it included. After ``handle.remove()`` the graph was reset,
    so replaying it raises instead of reading freed slots."""
    dev = _cuda()
    model = _stack(6, 32, Flaky).to(dev)
    flaky = model.layers[2]
    inputs = [torch.randn(4, 32, generator=torch.Generator().manual_seed(s)).to(dev) for s in (1, 2, 3)]
    refs = [_forward(model, x) for x in inputs]
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
        static = inputs[0].clone()
        graph, out = _capture(handle, model, static)
        eager = _forward(model, inputs[1])
        static.copy_(inputs[2])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(eager, refs[1]) and torch.equal(out, refs[2]), "eager then replay"
        static.copy_(inputs[0])
        graph.replay()
        eager = _forward(model, inputs[1])
        torch.cuda.synchronize()
        assert torch.equal(out, refs[0]) and torch.equal(eager, refs[1]), "replay then eager"
        flaky.fail = True
        with pytest.raises(RuntimeError, match="injected"):
            _forward(model, inputs[1])
        flaky.fail = False
        static.copy_(inputs[2])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, refs[2]), "replay right after a forward that raised"
        assert all(torch.equal(_forward(model, x), r) for x, r in zip(inputs, refs)), "eager after all that"
    with pytest.raises(RuntimeError):
        graph.replay()


@gpu
@pytest.mark.parametrize("step", [1, 2])
@pytest.mark.parametrize("failing", [0, 2, 5])
def test_gpu_forwards_after_an_exception_mid_forward_are_right(failing, step):
    """A layer raises in the middle of a forward (its copy waited for, the copies ahead in flight, the one
    after it never started); the forwards after it equal the resident model's."""
    dev = torch.accelerator.current_accelerator()
    model = _stack(6, 32, Flaky).to(dev)  # one class of block, or the stack is not found
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1)).to(dev)
    ref = _forward(model, x)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=step)):
        assert torch.equal(_forward(model, x), ref)
        model.layers[failing].fail = True
        with pytest.raises(RuntimeError, match="injected"):
            _forward(model, x)
        model.layers[failing].fail = False
        after = [_forward(model, x) for _ in range(3)]
    assert all(torch.equal(a, ref) for a in after)


@gpu
def test_gpu_second_device_leaves_the_current_device_alone():
    """Offloaded to device 1 while device 0 is current: the current device is still 0 after offload(), after
    a forward and after remove(), and the output equals the model resident on device 1."""
    acc = torch.accelerator
    if acc.device_count() < 2:
        pytest.skip(f"needs two accelerator devices; this machine has {acc.device_count()}")
    target = torch.device(acc.current_accelerator().type, 1)
    acc.set_device_index(0)
    try:
        model = tiny("llama")
        ids = prompt().to(target)
        model.to(target)
        ref_logits, ref_tokens = run(model, ids)
        model.to("cpu")
        assert acc.current_device_index() == 0
        handle = weightlift.offload(model, device=target, config=OffloadConfig(prefetch_step=2))
        assert acc.current_device_index() == 0, "after offload()"
        logits, tokens = run(model, ids)
        acc.synchronize(target)
        assert acc.current_device_index() == 0, "after a forward"
        assert handle.report().device == str(target)
        handle.remove()
        assert acc.current_device_index() == 0, "after remove()"
    finally:
        acc.set_device_index(0)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)


@gpu
def test_gpu_device_memory_of_an_offloaded_forward_is_resident_plus_pool_plus_activations():
    """A Llama of 8 layers x 13 MiB whose weights start on the CPU. Device memory allocated (synchronised)
    right after offload() grew by resident_bytes + pool_bytes, within 1 MiB (the caching allocator rounds
    each tensor up to 512 bytes); at least the pool. Then the peak of an offloaded forward (peak reset
    after offload) above the memory allocated before offload is weights + that forward's activations; the
    activations are those of the same forward resident (same kernels, same shapes), measured first as that
    forward's peak above the memory allocated with the whole model on the device. So peak - before -
    resident activations must be within resident_bytes + pool_bytes + 1 MiB: weights of offloaded layers
    held anywhere else on the device (a second copy, a grown pool) would exceed it by a layer or more."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.accelerator.current_accelerator()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**BIG_LLAMA, "num_hidden_layers": 8})).eval()
    ids = prompt().to(dev)
    model.to(dev)
    torch.accelerator.synchronize()
    base = torch.accelerator.memory_allocated(dev)
    torch.accelerator.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        ref = model(ids).logits
    torch.accelerator.synchronize()
    activations = torch.accelerator.max_memory_allocated(dev) - base
    model.to("cpu")
    torch.accelerator.synchronize()
    before = torch.accelerator.memory_allocated(dev)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
        torch.accelerator.synchronize()
        held = torch.accelerator.memory_allocated(dev) - before
        report = handle.report()
        weights = report.resident_bytes + report.pool_bytes
        assert report.pool_bytes <= held <= weights + MiB, (held, report.resident_bytes, report.pool_bytes)
        torch.accelerator.reset_peak_memory_stats(dev)
        with torch.inference_mode():
            out = model(ids).logits
        torch.accelerator.synchronize()
        peak = torch.accelerator.max_memory_allocated(dev)
    assert peak - before - activations <= weights + MiB, (peak - before, activations, weights)
    assert report.pool_bytes < report.offloaded_bytes / 2  # the bound above is tighter than "all weights"
    assert torch.equal(out, ref)


def _pinned_active() -> int:
    """Pinned host bytes handed out now (``active_bytes.current``). A pinned block used by an asynchronous
    copy is retired lazily: at the allocator's next allocation after the copy's event has completed. So
    synchronise, then allocate (and free) one pinned byte, so the figure counts what is really still held."""
    torch.cuda.synchronize()
    probe = torch.empty(1, dtype=torch.uint8, pin_memory=True)
    del probe
    stats = torch.cuda.host_memory_stats()
    if "active_bytes.current" not in stats:
        pytest.skip(f"torch.cuda.host_memory_stats() has no active_bytes.current (keys: {sorted(stats)[:6]} ...)")
    return int(stats["active_bytes.current"])


@gpu
def test_gpu_pinned_memory_is_back_to_its_starting_figure_after_remove():
    """Pinned host memory grows by at least the offloaded bytes while offloaded, and after a forward (whose
    copies tie the slabs to the copy stream), ``handle.remove()`` and ``del handle``, with no
    ``gc.collect()``, it is back to its starting figure: remove() frees the slabs itself, nothing waits
    for the garbage collector."""
    dev = _cuda()
    model = tiny("llama", layers=8)
    ids = prompt().to(dev)
    start = _pinned_active()
    handle = weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2))
    during = _pinned_active()
    offloaded = handle.report().offloaded_bytes
    run(model, ids)
    handle.remove()
    del handle
    after = _pinned_active()
    assert during - start >= offloaded, (during - start, offloaded)
    assert after == start, (start, during, after)


@gpu
def test_gpu_host_bytes_stay_within_5_percent_of_offloaded_bytes():
    """Layers of 260 KiB (not a power of two: the CUDA caching host allocator would round each pinned block
    up to 512 KiB): host_bytes <= 1.05 x offloaded_bytes, and host_bytes agrees with the growth of pinned
    memory the allocator reports, within 1%."""
    dev = _cuda()
    model = _stack(6, 182)
    x = torch.randn(4, 182, generator=torch.Generator().manual_seed(1))
    model.to(dev)
    ref = _forward(model, x.to(dev))
    model.to("cpu")
    start = _pinned_active()
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
        grown = _pinned_active() - start
        report = handle.report()
        out = _forward(model, x.to(dev))
    assert 255 * 1024 < report.offloaded_bytes / 6 < 265 * 1024
    assert torch.equal(out, ref)
    assert report.host_bytes <= 1.05 * report.offloaded_bytes, (report.host_bytes, report.offloaded_bytes)
    assert abs(grown - report.host_bytes) <= 0.01 * report.host_bytes, (grown, report.host_bytes)


@gpu
@pytest.mark.parametrize("order", [[5, 4, 3, 2, 1, 0], [0, 0, 1, 3, 2, 5, 5, 4]], ids=["reversed", "repeats"])
@pytest.mark.parametrize("slabs", [1, 2])
def test_gpu_disk_tier_with_one_or_two_staging_slabs_under_misses(tmp_path, slabs, order):
    """source="disk" with host_budget = 1 or 2 slots, so the staging ring has that many slabs; layers run
    in an order the prefetch plan did not expect (reversed, or some twice), so synchronous loads and
    read-ahead compete for the slabs. Every forward equals the resident model's, and misses are counted."""
    dev = torch.accelerator.current_accelerator()
    model = _stack(6, 32)
    model.order = order
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    model.to(dev)
    refs = [_forward(model, x.to(dev)) for _ in range(3)]
    model.to("cpu")
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as probe:
        slot = probe.report().slot_bytes
    config = OffloadConfig(source="disk", disk_path=str(tmp_path), prefetch_step=2, host_budget=slabs * slot)
    with weightlift.offload(model, device=dev, config=config) as handle:
        ring = getattr(handle, "ring", None)
        if ring is not None:
            assert len(ring.slabs) == slabs
        outs = [_forward(model, x.to(dev)) for _ in range(3)]
        report = handle.report()
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))
    assert report.prefetch_misses > 0
    assert report.host_bytes >= slabs * slot


@gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gpu_quantized_model_under_torch_compile_equals_compiled_resident(fmt):
    """torchao int8 (and int4) weight-only on a bf16 tiny Llama, offloaded, then ``torch.compile(model)``:
    its logits (twice, the second with the slots refilled by the first) equal the same model compiled
    resident, bit for bit. Dynamo is reset before and after: it does not guard on module hooks."""
    dev = _cuda()
    pytest.importorskip("torchao")
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    torch._dynamo.reset()
    model = tiny("llama", layers=4).to(dev).to(torch.bfloat16)
    try:
        quantize_(model.model.layers, Int4WeightOnlyConfig(group_size=32) if fmt == "int4" else Int8WeightOnlyConfig())
    except ImportError as err:  # a kernel package this torchao wants for the format (int4: mslk) is missing
        pytest.skip(f"torchao {fmt} weight-only needs a package missing here: {err}"[:300])
    except (RuntimeError, AssertionError) as err:
        if "mslk" in str(err):
            pytest.skip(f"torchao {fmt} weight-only needs the mslk package here: {err}"[:300])
        raise
    ids = prompt().to(dev)
    try:
        with torch.inference_mode():
            ref = torch.compile(model)(ids).logits
        torch._dynamo.reset()
        with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
            compiled = torch.compile(model)
            with torch.inference_mode():
                outs = [compiled(ids).logits for _ in range(2)]
            report = handle.report()
    finally:
        torch._dynamo.reset()
    assert all(torch.equal(o, ref) for o in outs)
    assert report.layers_offloaded == 4 and report.prefetch_misses == 0


@gpu
def test_gpu_compile_reduce_overhead_is_refused_naming_handle_cuda_graph():
    """`torch.compile(mode="reduce-overhead")` records CUDA graphs of its own around the offloaded layers:
    refused with the OffloadError that points at `handle.cuda_graph`, and eager forwards stay right."""
    dev = _cuda()
    model = _stack(6, 32).to(dev)
    x = torch.randn(4, 32, device=dev)
    ref = _forward(model, x)
    torch._dynamo.reset()
    try:
        with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)):
            compiled = torch.compile(model, mode="reduce-overhead")
            with pytest.raises(Exception, match="reduce-overhead") as info, torch.inference_mode():
                for _ in range(4):  # graph trees warm up first, then record
                    compiled(x)
            chain, err = [], info.value
            while err is not None:  # dynamo may wrap the OffloadError in its own error
                chain.append(err)
                err = err.__cause__ or err.__context__
            assert any(isinstance(e, OffloadError) for e in chain), chain
            torch._dynamo.reset()
            assert torch.equal(_forward(model, x), ref)
    finally:
        torch._dynamo.reset()


def test_gpu_bench_measures_a_tiny_model_on_the_cpu(tmp_path, monkeypatch):
    """Not gpu-marked. benchmarks/gpu_bench.py's `measure` on a tiny CPU model (synchronised perf_counter
    timing, no device memory figures there), its summary lines, and gpu_check.py's test tally and
    summary: the code `make gpu-check` runs on the GPU machine has run once before it gets there."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_bench
    import gpu_check

    model = tiny("llama", layers=2)  # prefetch_step=1: one slot, so every layer is copied at every forward
    snap = snapshot(model)
    trace = tmp_path / "tiny.trace.json"
    cpu = torch.device("cpu")
    result = gpu_bench.measure(model, prompt(length=4), device=cpu, new_tokens=3, reps=1, prefetch_step=1, trace=trace)
    assert_same(model, snap)  # given back resident, as it was
    rep, link = result["report"], result["link"]
    assert result["tokens_equal"] is True and result["tokens"] == 7
    # the timed generate: 3 forwards (prefill + 2 decode steps) x 2 layers, each a copy
    assert rep["layers_offloaded"] == 2 and rep["copies"] == 6 and rep["prefetch_misses"] == 0
    assert link["bytes_copied"] == rep["copies"] * rep["slot_bytes"] > 0  # tiny Llama: slot = one layer
    assert link["plain_copy_bytes_per_s"] > 0 and result["offloaded"]["decode_tokens_per_s"] > 0
    assert result["memory"]["peak_allocated"] is None and result["resident"]["prefill_s"] > 0
    assert json.loads(trace.read_text())["traceEvents"]
    record = {"model": "tiny", "weights": "random weights", "dtype": "float32", **result}
    assert json.loads(json.dumps(record)) == record  # a JSON line as it stands
    assert any("tokens equal to resident: yes" in line for line in gpu_bench.summary_lines(record))
    # what the bench builds: SmolLM2-135M's architecture and a >= 2 GiB bf16 Llama (on meta: no memory)
    smol = gpu_bench.random_llama(gpu_bench.SMOLLM2_135M, "meta")
    assert sum(p.numel() for p in smol.parameters()) == 134_515_008
    big = gpu_bench.random_llama(gpu_bench.LLAMA_2_5GIB, "meta")
    assert sum(p.numel() * p.element_size() for p in big.parameters()) >= 2 * 2**30
    # the check: a tally of the plugin's lines, and the summary's verdict
    lines = [
        {"nodeid": "a", "when": "start"}, {"nodeid": "a", "when": "setup", "outcome": "passed"},
        {"nodeid": "a", "when": "call", "outcome": "passed"}, {"nodeid": "a", "when": "teardown", "outcome": "passed"},
        {"nodeid": "b", "when": "start"}, {"nodeid": "b", "when": "setup", "outcome": "passed"},
        {"nodeid": "b", "when": "call", "outcome": "failed", "message": "AssertionError: x"},
        {"nodeid": "c", "when": "start"}, {"nodeid": "c", "when": "setup", "outcome": "skipped", "reason": "no ao"},
        {"nodeid": "d", "when": "start"}, {"nodeid": "d", "when": "setup", "outcome": "failed", "message": "E"},
        {"nodeid": "e", "when": "start"},
    ]  # fmt: skip
    tests = gpu_check.tally(lines)
    assert {k: [n for n, _ in v] for k, v in tests.items()} == {
        "passed": ["a"], "failed": ["b"], "skipped": ["c"], "errors": ["d"], "unfinished": ["e"]}  # fmt: skip
    tests.update(rc=1, seconds=1.0, timed_out=False)
    bench = {"rc": 0, "seconds": 1.0, "timed_out": False, "records": [record], "run": "r"}
    text, problems = gpu_check.summarise("cpu", torch.__version__, "pytest (installed)", tests, bench, 2.0)
    assert problems == ["1 tests failed, 1 errors"] and text[-1].startswith("RESULT: FAIL")
    clean = {**tests, "failed": [], "errors": [], "rc": 0}
    assert gpu_check.summarise("cpu", "x", "p", clean, bench, 2.0)[1] == []
    differ = {**bench, "records": [{**record, "tokens_equal": False}]}
    problems = gpu_check.summarise("cpu", "x", "p", clean, differ, 2.0)[1]
    assert problems == ["offloaded tokens differ from resident on tiny"]
