"""Host memory for masters: a few power-of-two blocks, so no allocator rounding inflates it."""

from __future__ import annotations

import pytest
import torch

import simdevice
import weightlift
from test_offload import Block
from weightlift import OffloadConfig
from weightlift.pool import ARENA_PARTS, HostArena, arena_sizes


@pytest.mark.parametrize("total", [1, 511, 512, 4097, 150_000, 737_280, 3 * 260 << 20, 7_800_000_000, (1 << 30) + 1])
def test_arena_sizes_are_powers_of_two_within_one_granule(total):
    sizes = arena_sizes(total)
    assert all(s & (s - 1) == 0 for s in sizes)  # each a power of two: a rounding allocator takes exactly it
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    granule = min(sizes)
    assert total <= sum(sizes) < total + granule
    assert granule <= max(512, total // ARENA_PARTS)  # so the excess is at most ~3% (or 512 bytes)
    assert len(sizes) <= 7


def test_arena_hands_out_consecutive_ranges_that_may_span_two_blocks():
    arena = HostArena(3000, pin=False)  # six 512-byte granules: blocks of 2048 and 1024
    assert [b.numel() for b in arena.blocks] == [2048, 1024] and arena.nbytes == 3072
    first = arena.take(1000)
    second = arena.take(1500)  # 1048 bytes left in the first block, then 452 of the second
    assert [(o, v.numel()) for o, v in first] == [(0, 1000)]
    assert [(o, v.numel()) for o, v in second] == [(0, 1048), (1048, 452)]
    assert second[0][1].data_ptr() == first[0][1].data_ptr() + 1000
    assert second[1][1].data_ptr() == arena.blocks[1].data_ptr()
    with pytest.raises(AssertionError, match="exhausted"):
        arena.take(600)


class Wide(torch.nn.Module):
    def __init__(self, dim: int, n: int = 6) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(dim) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("dim", [40, 181, 256])  # layers of 13 KiB, 257 KiB (just past a power of two), 514 KiB
def test_host_bytes_stay_within_5_percent_of_the_offloaded_bytes(monkeypatch, dim):
    """On the accelerator path every offloaded layer has a host master; a pinned block per layer would be
    rounded up to a power of two (a 257 KiB layer takes 512 KiB); the arena takes the layout plus < 1/32."""
    sim = simdevice.install(monkeypatch)
    torch.manual_seed(0)
    model = Wide(dim).eval()
    x = torch.randn(2, dim)
    with torch.inference_mode():
        ref = model(x)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=2)) as handle:
        sim.watch(handle)
        with torch.inference_mode():
            out = model(x)
        report = handle.report()
        laid_out = sum(layer.master.layout.nbytes for layer in handle.layers)  # with the 512-byte alignment
        per_layer = sum(1 << (layer.master.layout.nbytes - 1).bit_length() for layer in handle.layers)
    sim.assert_clean()
    sim.close()
    assert torch.equal(out, ref)
    # less than one granule over the layout, and a granule is at most 1/32 of it (pool.arena_sizes)
    assert laid_out <= report.host_bytes < laid_out * (1 + 1 / 32)
    if dim >= 181:  # tensors of tens of KiB: the alignment padding is small too
        assert report.host_bytes <= 1.05 * report.offloaded_bytes
    if dim == 181:
        assert per_layer > 1.9 * report.offloaded_bytes  # what one rounded block per layer would have taken
