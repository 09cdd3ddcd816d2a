"""The fake accelerator catches what it is there for (tests/fakeaccel). Each test plants a bug in weightlift
(monkeypatched for the test alone) that the CPU suite cannot see, because there every tensor is on the CPU
and every copy is synchronous, and checks that the fake device shows it: a resident buffer left on the
CPU, a stream `wait` that does nothing, host buffers that are not pinned. And the device itself: copies
held until ordered, pinned memory, its capacity. Run with ``--fake-accelerator`` (``make test`` does);
skipped without it."""

from __future__ import annotations

import pytest
import torch

import weightlift
from conftest import assert_same, prompt, refused, run, snapshot, tiny
from test_offload import Stack
from weightlift import OffloadConfig

pytestmark = pytest.mark.fakeaccel


@pytest.fixture
def fake():
    """The fake accelerator module, its mode put back and its queue empty after the test."""
    import fakeaccel

    mode = fakeaccel.mode()
    yield fakeaccel
    torch.accelerator.synchronize()
    fakeaccel.set_mode(mode)
    fakeaccel.set_capacity(16 << 30)


def _reference(family: str = "llama"):
    dev = torch.accelerator.current_accelerator()
    model = tiny(family)
    ids = prompt().to(dev)
    model.to(dev)
    ref = run(model, ids, new_tokens=3)
    model.to("cpu")
    return dev, model, ids, ref


def test_a_copy_is_held_until_ordered_and_reads_its_pinned_source_then(fake):
    """Deferred mode: a non-blocking copy waits in its stream until an event after it is waited for, and
    reads its (pinned) source then; synchronous mode copies at once."""
    dev = torch.accelerator.current_accelerator()
    src = torch.empty(8, pin_memory=True)
    assert src.is_pinned() and not torch.empty(8).is_pinned()
    for mode, expected in (("deferred", 7.0), ("sync", 1.0)):
        fake.set_mode(mode)
        src.fill_(1.0)
        dst = torch.zeros(8, device=dev)
        side, done = torch.Stream(device=dev), torch.Event(device=dev)
        with side:
            dst.copy_(src, non_blocking=True)
            done.record(side)
        assert done.query() == (mode == "sync")
        src.fill_(7.0)  # the source rewritten before the copy was waited for: a bug, seen in deferred mode
        torch.accelerator.current_stream(dev).wait_event(done)
        assert done.query()
        assert torch.equal(dst.cpu(), torch.full((8,), expected)), mode


def test_new_device_memory_is_poisoned_in_deferred_mode(fake):
    dev = torch.accelerator.current_accelerator()
    fake.set_mode("deferred")
    assert torch.isnan(torch.empty(64, device=dev)).all()
    assert (torch.empty(8, dtype=torch.int32, device=dev) == -1).all()


def test_tensors_on_two_devices_are_refused_as_cuda_refuses_them(fake):
    dev = torch.accelerator.current_accelerator()
    x = torch.ones(3, device=dev)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        x + torch.ones(3)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        torch.cat([x, torch.ones(3)])
    assert torch.equal((x + torch.tensor(2.0)).cpu(), torch.full((3,), 3.0))  # a 0-dim CPU scalar is allowed
    assert torch.equal(x[torch.tensor([0, 2])].cpu(), torch.ones(2))  # and CPU indices, as on CUDA


def test_device_memory_beyond_the_capacity_is_out_of_memory(fake):
    dev = torch.accelerator.current_accelerator()
    before = torch.accelerator.memory_allocated(dev)
    fake.set_capacity(before + (1 << 20))
    kept = torch.empty(1 << 18, dtype=torch.uint8, device=dev)
    assert torch.accelerator.memory_allocated(dev) == before + (1 << 18)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        torch.empty(1 << 20, dtype=torch.uint8, device=dev)
    del kept
    assert torch.accelerator.memory_allocated(dev) == before


class ScaledStack(Stack):
    """`Stack` (test_offload.py) whose output is scaled by a buffer outside the layers: a resident buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_planted_a_resident_buffer_left_on_the_cpu_is_caught(monkeypatch, fake):
    """`offload` moving only the resident parameters to the device, the buffers left on the CPU: the
    forward fails the device check. With a CPU target nothing can be left behind, so only here."""
    import weightlift.apply

    dev = torch.accelerator.current_accelerator()
    torch.manual_seed(0)
    model = ScaledStack().eval()
    x = torch.randn(4, 32).to(dev)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)), torch.inference_mode():
        model(x)  # as shipped: every resident tensor is moved
    real = weightlift.apply.move_to

    def parameters_only(handle, tensors, dev):
        real(handle, [t for t in tensors if isinstance(t, torch.nn.Parameter)], dev)

    monkeypatch.setattr(weightlift.apply, "move_to", parameters_only)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)), torch.inference_mode():
        assert model.scale.device.type == "cpu"
        with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
            model(x)


@pytest.mark.parametrize("source", ["host", "disk"])
def test_planted_a_stream_wait_that_does_nothing_is_caught_in_deferred_mode(tmp_path, monkeypatch, fake, source):
    """Compute that does not wait for its layer's copy reads the slot before the copy ran: in deferred mode
    the outputs differ from the resident model's (the slots are poisoned or hold another layer); in
    synchronous mode, as on the CPU, the same bug gives the right numbers."""
    from weightlift.streams import TorchStreams

    monkeypatch.setattr(TorchStreams, "wait", lambda self, stream, event: None)
    dev, model, ids, ref = _reference()
    how = {"source": "disk", "disk_path": str(tmp_path)} if source == "disk" else {}
    config = OffloadConfig(prefetch_step=2, **how)
    outs = {}
    for mode in ("deferred", "sync"):
        fake.set_mode(mode)
        with weightlift.offload(model, device=dev, config=config):
            outs[mode] = run(model, ids, new_tokens=3)
    assert not torch.equal(outs["deferred"][0], ref[0])
    assert torch.equal(outs["sync"][0], ref[0]) and torch.equal(outs["sync"][1], ref[1])


def test_planted_host_masters_that_are_not_pinned_are_counted(monkeypatch, fake):
    """Host masters allocated pageable: the outputs are right, but every copy to the device was issued
    non-blocking from pageable memory (a real device runs those synchronously): counted, where the
    weightlift as shipped issues none (every gpu test checks that on the fake device)."""
    from weightlift.streams import TorchStreams

    real = TorchStreams.__init__

    def unpinned(self, device):
        real(self, device)
        self.pin = False

    dev, model, ids, ref = _reference()
    for planted in (False, True):
        if planted:
            monkeypatch.setattr(TorchStreams, "__init__", unpinned)
        fake.reset_counters()
        with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)) as handle:
            out = run(model, ids, new_tokens=3)
            assert all(block.is_pinned() for block in handle.arena.blocks) is not planted
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        pageable = fake.counters()["pageable_async_copies"]
        assert (pageable > 0) if planted else (pageable == 0), (planted, pageable)


def test_a_model_given_back_by_remove_is_on_its_original_devices(fake):
    """Half the model on the device, half on the CPU before offloading: after remove(), each tensor is where
    it was, bitwise."""
    dev = torch.accelerator.current_accelerator()
    model = tiny("llama")
    model.model.layers[:2].to(dev)
    snap = snapshot(model)
    with weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2)):
        assert {p.device.type for p in model.parameters()} == {dev.type}
        run(model, prompt().to(dev), new_tokens=1)
    assert_same(model, snap)


def test_a_device_too_small_for_the_offloading_is_refused_and_the_model_is_as_it_was(fake):
    """A device whose free memory holds neither the resident weights and the pool: `OffloadError` naming
    the device and the fix (a budget), the model untouched and no device memory left held."""
    dev = torch.accelerator.current_accelerator()
    model = tiny("llama", layers=8)
    torch.accelerator.synchronize()
    before = torch.accelerator.memory_allocated(dev)
    fake.set_capacity(before + 300 * 1024)  # the pool alone (3 slots of ~160 KiB) does not fit
    with refused(model, r"`device`='fakeaccel:0' ran out of memory while offloading .*pass a `budget`"):
        weightlift.offload(model, device=dev, config=OffloadConfig(prefetch_step=2))
    assert torch.accelerator.memory_allocated(dev) == before
