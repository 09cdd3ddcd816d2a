from __future__ import annotations

import pytest

from weightlift.schedule import Prefetcher, cyclic_slots, make_schedule, spread_order


@pytest.mark.parametrize("n", range(1, 25))
@pytest.mark.parametrize("step", range(1, 9))
def test_cyclic_slots_never_collide_and_use_fewest_slots(n, step):
    slots = cyclic_slots(n, step)
    s = min(step, n)
    assert len(slots) == n
    for p in range(n):  # any `s` cyclically consecutive positions use distinct slots
        window = [slots[(p + k) % n] for k in range(s)]
        assert len(set(window)) == s
    blocks = n // s
    assert max(slots) + 1 == -(-n // blocks)  # ceil(n / floor(n / s)), the chromatic number
    if n % s == 0:
        assert max(slots) + 1 == s


def test_vllm_rule_would_collide_where_ours_does_not():
    n, step = 5, 2
    vllm = [p % step for p in range(n)]
    # the copy of position 0 (next forward) starts when position 3 finishes, into the slot position 4 still uses
    assert vllm[(3 + step) % n] == vllm[4]
    ours = cyclic_slots(n, step)
    assert ours[(3 + step) % n] != ours[4]


class Recorder:
    """An engine that records what it is asked; a job is its position."""

    def __init__(self):
        self.log = []
        self.released = []

    def start(self, p, s):
        self.log.append(("start", p, s))
        return ("ticket", p)

    def wait(self, ticket):
        self.log.append(("wait", ticket[1]))

    def load_now(self, p, s, after):
        self.log.append(("sync", p, s, after))

    def release(self, s):
        self.released.append(s)


def _prefetcher(n, step):
    rec = Recorder()
    pf = Prefetcher(make_schedule(range(n), step), rec, list(range(n)))
    pf.prime()
    return pf, rec


def test_in_order_run_hits_every_layer_and_prefetches_step_ahead():
    pf, rec = _prefetcher(5, 2)
    assert rec.log == [("start", 0, 0), ("start", 1, 1)]
    for _ in range(3):
        for p in range(5):
            pf.before(p)
            pf.after(p)
    assert (pf.hits, pf.misses) == (15, 0)
    starts = [e[1] for e in rec.log if e[0] == "start"]
    # slots are [0, 1, 2, 0, 1]: position 2 has slot 2 to itself, so after its first load it stays there
    assert make_schedule(range(5), 2).slot_of == (0, 1, 2, 0, 1)
    assert starts == [0, 1, 2, 3, 4, 0, 1, 3, 4, 0, 1, 3, 4, 0, 1]
    assert rec.released == [0, 1, 2, 0, 1] * 3  # each layer's slot, released after it ran


def test_every_slot_is_released_at_once_when_asked_and_on_an_abort():
    pf, rec = _prefetcher(5, 2)
    pf.before(0)
    pf.after(0, every_slot=True)
    pf.before(1)
    pf.aborted(1)
    assert rec.released == [None, 1]
    assert [e for e in rec.log if e[0] == "start"][-1] == ("start", 2, 2)  # after(0) prefetched; aborted(1) not


def test_a_layer_run_twice_is_loaded_synchronously_after_the_copy_in_flight():
    pf, rec = _prefetcher(4, 1)  # one slot
    pf.before(0)
    pf.after(0)  # starts the copy of 1 into slot 0
    pf.before(0)  # 0 again: the slot is receiving layer 1
    assert pf.misses == 1
    assert rec.log[-1] == ("sync", 0, 0, ("ticket", 1))


def test_step_at_least_layers_loads_each_layer_once():
    pf, rec = _prefetcher(3, 7)
    for _ in range(4):
        for p in range(3):
            pf.before(p)
            pf.after(p)
    assert [e for e in rec.log if e[0] == "start"] == [("start", 0, 0), ("start", 1, 1), ("start", 2, 2)]
    assert (pf.hits, pf.misses, pf.copies) == (12, 0, 3)


def test_step_zero_loads_every_layer_when_it_runs():
    pf, rec = _prefetcher(4, 0)
    assert rec.log == [] and pf.schedule.n_slots == 1
    for p in range(4):
        pf.before(p)
        pf.after(p)
    assert [e[0] for e in rec.log] == ["sync"] * 4
    assert (pf.hits, pf.misses, pf.copies) == (0, 4, 4)


def test_spread_order_prefixes_are_spread():
    for n in range(1, 33):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    assert spread_order(8)[:2] == [4, 2] and sorted(spread_order(8)[:4]) == [1, 2, 4, 6]


@pytest.mark.parametrize("n,step,warned", [(4, 4, True), (4, 9, True), (4, 3, False), (1, 2, False), (4, 0, False)])
def test_a_step_that_covers_every_offloaded_layer_is_warned_about(caplog, n, step, warned):
    """The pool then holds every offloaded layer: nothing saved, which the warning says with the fix."""
    with caplog.at_level("WARNING", logger="weightlift.schedule"):
        schedule = make_schedule(range(n), step)
    found = [r.getMessage() for r in caplog.records if r.name == "weightlift.schedule"]
    assert bool(found) == warned
    if warned:
        assert f"prefetch_step={step} >= {n} offloaded layers" in found[0] and "lower `prefetch_step`" in found[0]
        assert len(set(schedule.slot_of)) == n  # what it warns of: a slot for every layer
