"""The planner: the schedule simulation by hand, budgets respected exactly, plans as data, misuse refused."""

from __future__ import annotations

import json
import re

import pytest
import torch

import weightlift
from conftest import assert_same, hook_counts, prompt, run, snapshot, tiny
from weightlift import OffloadConfig, OffloadError, Plan
from weightlift.forecast import simulate
from weightlift.plan import fingerprint

# --------------------------------------------------------------------------------------- simulation by hand


def test_nothing_offloaded_costs_compute_only():
    assert simulate([1.0, 2.0, 3.0], 0.5, [], {}, {}, 1)[0] == pytest.approx(6.5)


def test_no_prefetch_adds_every_copy():
    duration, waits = simulate([1.0] * 4, 0.0, [0, 1, 2, 3], dict.fromkeys(range(4), 0.5), {}, 0)
    assert duration == pytest.approx(6.0)
    assert waits == [0.5] * 4


def test_step_one_over_every_layer_cannot_overlap():
    # the copy of layer k+1 is issued when layer k ends, and layer k+1 starts right then
    duration, waits = simulate([1.0] * 4, 0.0, [0, 1, 2, 3], dict.fromkeys(range(4), 0.5), {}, 1)
    assert duration == pytest.approx(6.0)
    assert waits == [0.5] * 4


def test_a_resident_layer_between_hides_a_copy_shorter_than_it():
    offloaded = [1, 3]
    duration, waits = simulate([1.0] * 4, 0.0, offloaded, {1: 0.8, 3: 0.8}, {}, 1)
    assert duration == pytest.approx(4.0) and waits == [0.0] * 4
    duration, waits = simulate([1.0] * 4, 0.0, offloaded, {1: 1.5, 3: 1.5}, {}, 1)
    assert duration == pytest.approx(5.0)  # each copy shows 0.5 s past the layer it overlaps
    assert waits == [0.0, 0.5, 0.0, 0.5]


def test_link_bound_step_two_is_bounded_by_the_copies():
    # copies of 2 s, compute 1 s: the engine is busy all the time, a forward of 4 layers takes 4 copies
    duration, _ = simulate([1.0] * 4, 0.0, [0, 1, 2, 3], dict.fromkeys(range(4), 2.0), {}, 2)
    assert duration == pytest.approx(8.0)


def test_serial_cost_is_never_hidden():
    duration, _ = simulate([1.0] * 2, 0.0, [0, 1], {0: 0.0, 1: 0.0}, {0: 0.25, 1: 0.25}, 1)
    assert duration == pytest.approx(2.5)


def test_a_pool_holding_every_layer_copies_nothing_after_the_first_forward():
    duration, _ = simulate([1.0] * 3, 0.0, [0, 1, 2], dict.fromkeys(range(3), 5.0), {}, 3)
    assert duration == pytest.approx(3.0)


# --------------------------------------------------------------------------------------- plans on a model


def assert_refused(model, call, message):
    """``call()`` raises an OffloadError containing ``message`` and leaves the model as it was."""
    snap, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(OffloadError, match=re.escape(message)):
        call()
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks


@pytest.fixture(scope="module")
def model():
    return tiny("llama", layers=8)


@pytest.fixture(scope="module")
def reference(model):
    return run(model, prompt())


def _plan(model, budget, tmp_path, **kw):
    return weightlift.plan(model, device="cpu", budget=budget, disk_path=tmp_path, reps=2, **kw)


@pytest.mark.parametrize("budget", ["10MiB", "1000KiB", "700KiB", "400KiB", "214336"])
def test_every_budget_is_respected_and_outputs_are_bitwise(model, reference, tmp_path, budget):
    snap = snapshot(model)
    plan = _plan(model, budget, tmp_path)
    limit = weightlift.config.parse_size(budget)
    assert plan.device_bytes <= limit
    with weightlift.offload(model, plan=plan) as handle:
        logits, tokens = run(model, prompt())
        report = handle.report()
    assert report.device_bytes == plan.device_bytes <= limit
    assert report.resident_bytes == plan.resident_bytes and report.pool_bytes == plan.pool_bytes
    assert report.layers_offloaded == len(plan.offloaded) and report.prefetch_misses == 0
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert_same(model, snap)


def test_everything_fits_offloads_nothing(model, tmp_path):
    plan = _plan(model, "1GiB", tmp_path)
    assert plan.offloaded == [] and plan.pool_bytes == 0 and plan.source == "host"
    assert plan.device_bytes == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_the_minimum_offloads_every_layer_into_one_window(model, tmp_path):
    plan = _plan(model, "214336", tmp_path)
    assert plan.offloaded == list(range(8)) and plan.pool_bytes == plan.layer_bytes[0]
    assert "offloaded" in str(plan) and "model.layers.7" in str(plan)


def test_below_the_minimum_states_it_and_leaves_the_model_alone(model, tmp_path, monkeypatch):
    """Refused before anything is measured: the model never runs, and no layer cache is written."""
    monkeypatch.setenv("WEIGHTLIFT_CACHE", str(tmp_path))
    runs = []
    hook = model.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        assert_refused(
            model,
            lambda: weightlift.offload(model, device="cpu", budget="214335"),
            "too small for LlamaForCausalLM: the smallest plan needs 209.31 KiB (214336 bytes)",
        )
    finally:
        hook.remove()
    assert runs == [] and list(tmp_path.iterdir()) == []


def test_offload_with_a_budget_plans_and_applies(model, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIGHTLIFT_CACHE", str(tmp_path))
    with weightlift.offload(model, device="cpu", budget="400KiB") as handle:
        logits, tokens = run(model, prompt())
        assert handle.plan is not None and handle.report().device_bytes <= 400 * 1024
        assert str(tmp_path) in handle.report().source
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])


def _choice(model, tmp_path, monkeypatch, budget, cost):
    """`plan` with its prediction replaced by ``cost(offloaded layers, step)``: which plan it picks."""
    import sys

    def predict(compute, other, nbytes, chosen, step, *rates):
        return cost(len(chosen), step), [0.0] * len(compute)

    monkeypatch.setattr(sys.modules["weightlift.forecast"], "predict", predict)  # the planner's and the Plan's
    return _plan(model, budget, tmp_path)


@pytest.mark.parametrize("layer_gain,step_gain", [(0.001, 0.001), (0.05, 0.001), (0.001, 0.05)])
def test_the_plan_is_the_fastest_predicted_and_a_gain_under_two_percent_is_a_tie(
    model, tmp_path, monkeypatch, layer_gain, step_gain
):
    """Each layer more, or a step more, is predicted ``gain`` faster (of 1 s). Under 2% each (and under 2% summed)
    the fewest layers that fit and step 1 win; at 5% a layer, every layer at step 1; at 5% a step, the longest
    step, which takes every layer too (a step is at most the layers offloaded)."""
    budget = 700 * 1024
    plan = _choice(model, tmp_path, monkeypatch, budget, lambda k, step: 1.0 - layer_gain * k - step_gain * step)
    # by hand: every layer the same size; offloading k leaves total - k * layer resident, plus a window of one
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    fewest = next(k for k in range(9) if total - k * layer + (plan.layer_bytes[0] if k else 0) <= budget)
    assert 0 < fewest < 8 and plan.layer_bytes == [plan.layer_bytes[0]] * 8 >= [layer] * 8
    k = 8 if max(layer_gain, step_gain) > 0.02 else fewest
    assert plan.offloaded == sorted(weightlift.schedule.spread_order(8)[:k])  # spread along the stack
    assert plan.prefetch_step == (min(k, 8) if step_gain > 0.02 else 1)
    assert plan.predicted_s == pytest.approx(1.0 - layer_gain * k - step_gain * plan.prefetch_step)


def test_plan_round_trips_through_json(model, tmp_path):
    plan = _plan(model, "700KiB", tmp_path)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.config() == plan.config()
    assert json.loads(text)["workloads"]["decode"]["predicted_s"] == plan.predicted_s
    assert {"prefill", "decode"} == set(plan.workloads) and plan.goal == "decode"
    assert plan.bound in ("compute", "link")


def test_a_plan_for_another_model_is_refused(model, tmp_path):
    plan = _plan(model, "700KiB", tmp_path)
    other = tiny("llama", layers=6)
    assert_refused(other, lambda: weightlift.offload(other, plan=plan), "`plan` was made for another model")
    assert fingerprint(other) != plan.fingerprint


def test_a_plan_for_another_device_is_refused(model, tmp_path):
    plan = Plan.from_dict({**_plan(model, "700KiB", tmp_path).to_dict(), "device": "meta"})
    assert_refused(model, lambda: weightlift.offload(model, plan=plan), "`plan` was made for device meta")


@pytest.mark.parametrize(
    "bad,message",
    [("{not json", "`plan` is not valid JSON"), ('{"model": "x"}', "`plan` is not a weightlift plan")],
)
def test_a_damaged_plan_file_is_refused(bad, message):
    with pytest.raises(OffloadError, match=message):
        Plan.from_json(bad)


def test_one_way_to_say_how(model, tmp_path):
    assert_refused(
        model,
        lambda: weightlift.offload(model, config=OffloadConfig(), budget="1GiB"),
        "pass one of `config`, `budget` or `plan`, not `config` and `budget`",
    )


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"budget": "lots"}, "`budget`='lots' is not a size"),
        ({"budget": "1GiB", "sample": "text"}, "`sample` must be a tensor"),
    ],
)
def test_bad_plan_arguments(model, tmp_path, kw, message):
    assert_refused(model, lambda: weightlift.plan(model, device="cpu", disk_path=tmp_path, **kw), message)


def test_a_model_without_a_language_head_needs_a_sample(tmp_path):
    blocks = torch.nn.Sequential(torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)]))
    assert_refused(blocks, lambda: weightlift.plan(blocks, device="cpu", budget="1GiB", disk_path=tmp_path),
                   "`sample` is needed for Sequential: pass an input")  # fmt: skip
    plan = weightlift.plan(blocks, device="cpu", budget=2 * 16 * 17 * 4 + 1024, disk_path=tmp_path,
                           sample=torch.ones(2, 16), reps=2)  # fmt: skip
    assert plan.goal == "sample" and len(plan.offloaded) >= 2
    x = torch.randn(3, 16)
    with torch.inference_mode():
        expected = blocks(x)
        with weightlift.offload(blocks, plan=plan):
            assert torch.equal(blocks(x), expected)


def test_a_language_model_is_timed_on_a_32_token_prefill_and_a_decode_step_with_its_cache(model, tmp_path):
    """Without a `sample`, what plan() runs is a 32-token prompt and then one token with that prompt's KV
    cache; with a `sample`, exactly that sample."""
    seen = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        seen.append((tuple(ids.shape), 0 if cache is None else cache.get_seq_length()))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _plan(model, "400KiB", tmp_path)
        assert seen and set(seen) == {((1, 32), 0), ((1, 1), 32)}
        seen.clear()
        ids = prompt()
        _plan(model, "400KiB", tmp_path, sample={"input_ids": ids})
        assert seen and set(seen) == {(tuple(ids.shape), 0)}
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def blocks_plan(tmp_path_factory):
    """Four Linear blocks and a plan for them (quick: a sample, one rep)."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)]).eval()
    plan = weightlift.plan(blocks, device="cpu", budget=2 * 16 * 17 * 4 + 1024, disk_path=tmp_path_factory.mktemp("c"),
                           sample=torch.ones(2, 16), reps=1, layers="")  # fmt: skip
    return blocks, plan


def _edited(plan: Plan, edit) -> str:
    data = json.loads(plan.to_json())
    edit(data)
    return json.dumps(data)


HAND_EDITS = {
    "renamed-field": (lambda d: d.update(prefetch_steps=d.pop("prefetch_step")),
                      "`plan` has an unknown field `plan.prefetch_steps`: its fields are model, "),
    "missing-field": (lambda d: d.pop("offloaded"),
                      "`plan` is not a weightlift plan: `plan` has no field `plan.offloaded`"),
    "string-for-int": (lambda d: d.update(prefetch_step="2"), "`plan.prefetch_step` must be int, got '2'"),
    "bool-for-int": (lambda d: d.update(budget=True), "`plan.budget` must be int, got True"),
    "int-for-bool": (lambda d: d.update(mmap=1), "`plan.mmap` must be bool, got 1"),
    "item-of-a-list": (lambda d: d.update(offloaded=[0, "1"]), "`plan.offloaded` must be list[int], got [0, '1']"),
    "workload-field": (lambda d: d["workloads"]["sample"].update(compute_s="fast"),
                       "`plan.workloads.sample.compute_s` must be list[float], got 'fast'"),
    "workload-unknown": (lambda d: d["workloads"]["sample"].update(note=1),
                         "`plan.workloads.sample` has an unknown field `plan.workloads.sample.note`"),
    "version-unknown": (lambda d: d.update(version=2),
                        "`plan.version`=2: this weightlift reads plans of version 1. Make the plan again"),
    "version-string": (lambda d: d.update(version="1"), "`plan.version`='1': this weightlift reads plans of version 1"),
    "other-json": (lambda d: d.clear() or d.update(x=[]), "`plan` has an unknown field `plan.x`"),
}  # fmt: skip


@pytest.mark.parametrize("edit", list(HAND_EDITS))
def test_a_plan_edited_by_hand_is_refused_naming_the_field(blocks_plan, edit):
    _, plan = blocks_plan
    how, message = HAND_EDITS[edit]
    with pytest.raises(OffloadError, match=re.escape(message)) as err:
        Plan.from_json(_edited(plan, how))
    assert "the plan again with weightlift.plan()" in str(err.value)  # the fix


def test_a_plan_that_is_no_object_and_a_device_edited_by_hand_are_refused(blocks_plan):
    blocks, plan = blocks_plan
    with pytest.raises(OffloadError, match=r"`plan` is not a weightlift plan \(a JSON object of its fields, got list"):
        Plan.from_json("[1, 2]")
    bad = Plan.from_json(_edited(plan, lambda d: d.update(device="gpu0")))  # a string: read; checked at offload
    assert_refused(blocks, lambda: weightlift.offload(blocks, plan=bad),
                   "`plan.device`='gpu0' is not a device torch knows: make the plan again")  # fmt: skip


def test_a_plan_saved_before_versions_reads_as_version_1_and_applies(blocks_plan):
    """Plans written before the ``version`` field (the CLI's saved plans among them) are version 1."""
    blocks, plan = blocks_plan
    assert plan.version == 1 and json.loads(plan.to_json())["version"] == 1
    old = Plan.from_json(_edited(plan, lambda d: d.pop("version")))
    assert old == plan
    x = torch.randn(3, 16)
    with torch.inference_mode():
        expected = blocks(x)
        with weightlift.offload(blocks, plan=old) as handle:
            assert torch.equal(blocks(x), expected) and handle.report().layers_offloaded == len(plan.offloaded) > 0


def test_a_plan_that_is_not_a_plan_is_refused(model):
    assert_refused(model, lambda: weightlift.offload(model, plan="plan.json"),
                   "`plan` must be a weightlift.Plan (from weightlift.plan()), got str")  # fmt: skip


def test_a_model_on_the_meta_device_is_refused_naming_the_ways_to_plan_it(tmp_path):
    """Without `checkpoint` there is nothing to time: refused before measuring, naming the fixes."""
    with torch.device("meta"):
        meta = tiny("llama")
    assert_refused(meta, lambda: weightlift.plan(meta, device="cpu", budget="1GiB", disk_path=tmp_path),
                   "`model` has parameters on the meta device: plan() times the model's layers, so load its "
                   "weights first, pass `checkpoint`")  # fmt: skip
    assert list(tmp_path.iterdir()) == []
