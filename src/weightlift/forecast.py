"""The predicted time of a forward: a small simulation of the schedule (one copy engine in FIFO order,
the copy of offloaded position ``p + step`` issued when ``p`` finishes, a layer starting once the previous
one is done and its own copy has landed). `plan` chooses by it; a `Plan` predicts with it."""

from __future__ import annotations

from collections.abc import Sequence


def simulate(
    compute: Sequence[float],
    other: float,
    offloaded: Sequence[int],
    copy: dict[int, float],
    serial: dict[int, float],
    step: int,
    forwards: int = 3,
) -> tuple[float, list[float]]:
    """Predicted seconds per forward in steady state, and each layer's exposed wait for its copy.

    ``compute[i]`` is layer ``i``'s compute; ``other`` the rest of a forward (placed after the last layer,
    where the copies of the first ``step`` offloaded layers overlap it); ``copy[i]`` the transfer time of an
    offloaded layer (overlappable); ``serial[i]`` extra time it costs inside compute (page faults of a
    mapped layer). ``step=0``: no prefetch, each offloaded layer is loaded when it runs.
    """
    order = list(offloaded)
    n = len(order)
    position = {index: p for p, index in enumerate(order)}
    keep_all = step and n and step >= n  # the pool holds every offloaded layer: copied once, then resident
    ready: dict[int, float] = {}
    engine = 0.0
    t = 0.0

    def issue(p: int, at: float) -> None:
        nonlocal engine
        start = max(at, engine)
        engine = start + copy[order[p]]
        ready[order[p]] = engine

    for p in range(min(step, n)):
        issue(p, 0.0)
    waits = [0.0] * len(compute)
    duration = 0.0
    for forward in range(forwards):
        begin = t
        last = forward == forwards - 1
        for i, c in enumerate(compute):
            wait = 0.0
            if i in position:
                if not step:
                    wait = copy[i]
                elif keep_all and forward:
                    wait = 0.0
                else:
                    wait = max(0.0, ready[i] - t)
                t += wait + serial.get(i, 0.0)
            t += c
            if i in position and step and not keep_all:
                issue((position[i] + step) % n, t)
            if last:
                waits[i] = wait
        t += other
        duration = t - begin
    return duration, waits


def copy_seconds(nbytes: int, bytes_per_s: float) -> float:
    return nbytes / bytes_per_s if bytes_per_s else 0.0


def predict(
    compute: Sequence[float], other: float, layer_bytes: Sequence[int], offloaded: Sequence[int], step: int,
    bytes_per_s: float, serial_s_per_byte: float,
) -> tuple[float, list[float]]:
    """`simulate` with each offloaded layer's copy and serial time from its bytes and the link's rates."""
    return simulate(
        compute, other, offloaded, {i: copy_seconds(layer_bytes[i], bytes_per_s) for i in offloaded},
        {i: layer_bytes[i] * serial_s_per_byte for i in offloaded}, step,
    )  # fmt: skip
