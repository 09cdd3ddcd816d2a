"""The soak at small counts: the functions of ``benchmarks/soak.py`` (imported from that file, so the test and
``make soak`` cannot drift apart), 300 identical decode steps per tier and 32 offload/remove cycles.

Asserted per tier (`soak.tier_failures`): logits ``torch.equal`` to a resident copy at steps 0, 100, 200
and 299; RSS (``VmRSS`` after ``malloc_trim``) grows by less than 1 MiB and live Python
memory blocks by fewer than 1,000 from step 150 to the end; fds and
threads (OS and Python) the same at both; after ``remove()`` fds, threads, hooks and op keys as before
``offload()``; ``report()`` hits + misses = offloaded layers x forwards, with no miss. For the cycles
(`soak.cycle_failures`): hooks and op keys back after every ``remove()``, RSS, fds and threads flat from the
first round of tiers to the end, the model bitwise as it was and decoding as the resident copy.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def _load_soak():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("weightlift_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


soak = _load_soak()
STEPS, WINDOW, EVERY, CYCLES = 300, 150, 100, 32


@pytest.fixture
def one_thread():
    """As ``make soak`` runs (``--threads 1``): two intra-op threads spinning on this shared 2-core box made each
    step 10x slower; the properties do not depend on it (the resident copy runs with the same setting)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


@pytest.mark.parametrize("tier", soak.TIERS)
def test_identical_decode_steps_hold_nothing_more_and_equal_resident(tmp_path, tier, one_thread):
    row = soak.soak_tier(tier, tmp_path, steps=STEPS, window=WINDOW, check_every=EVERY)
    assert row["failures"] == [], soak.summary(row)
    assert row["checkpoints"] == 4  # steps 0, 100, 200 and the last
    assert row["prefetch_hits"] == row["layer_runs"] == 5 * (1 + STEPS)
    # the tier is the one named: host RAM reports "host", a mapped file "(mapped)"
    assert (row["source"] == "host") == (tier == "host")
    assert row["source"].endswith("(mapped)") == (tier in ("disk mapped", "checkpoint"))


def test_offload_remove_cycles_hold_nothing_more(tmp_path, one_thread):
    row = soak.soak_cycles(tmp_path, cycles=CYCLES)
    assert row["failures"] == [], soak.summary(row)
    assert row["cycles"] == CYCLES and row["bitwise"] and row["equal"]


def _row(**change) -> dict:
    """A tier row that passes, with ``change`` applied (to a sample when the key is ``sample.field``)."""
    sample = {"rss": 100 * soak.MiB, "fds": 6, "threads": 3, "py_threads": 1, "hooks": 0, "op_keys": 0,
              "blocks": 10**6}
    row = {"unequal_at": [], "rss_growth": 0, "rss_limit": soak.MiB, "blocks_growth": 0, "blocks_limit": 1000,
           "window": 200, "prefetch_hits": 10,
           "prefetch_misses": 0, "layer_runs": 10,
           "samples": {k: dict(sample) for k in ("before", "at_window", "end", "after_remove")}}  # fmt: skip
    for key, value in change.items():
        where, _, field = key.partition(".")
        if field:
            row["samples"][where][field] = value
        else:
            row[key] = value
    return row


@pytest.mark.parametrize("change", [
    {"unequal_at": [300]}, {"rss_growth": soak.MiB}, {"blocks_growth": 1000},
    {"end.fds": 7}, {"end.threads": 4}, {"end.py_threads": 2},
    {"after_remove.fds": 7}, {"after_remove.threads": 4}, {"after_remove.hooks": 6}, {"after_remove.op_keys": 5},
    {"prefetch_misses": 1, "prefetch_hits": 9}, {"prefetch_hits": 9},
], ids=lambda c: ",".join(c))  # fmt: skip
def test_each_tier_property_can_fail(change):
    assert soak.tier_failures(_row()) == []
    assert len(soak.tier_failures(_row(**change))) == 1
