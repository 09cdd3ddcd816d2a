"""The device expert cache (`weightlift.expert_cache`): experts kept on the device across forwards.

Every run is compared bit for bit with the resident model, with every slot first filled with 0xFF (NaN) and
forgotten (`test_experts._poison_slots`): an expert copied from a wrong or unfilled cache entry, or not
copied at all, changes the output. Counts are derived by hand, or from a routing trace recorded on the
resident model and a cache simulated in the test.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

import weightlift
from conftest import assert_refused, prompt, run, tiny
from test_experts import EXPERTS, FAMILIES, LAYERS, TOP_K, ListModel, _expert_bytes, _poison_slots, moe, tier_config
from weightlift import OffloadConfig
from weightlift.expert_cache import ExpertCache
from weightlift.experts import WHOLE_AT, find_experts, routing_of

TIERS = {
    "host": dict(prefetch_step=1),  # one slot for 4 layers: a layer's experts never stay in its slot
    "disk read": dict(source="disk", mmap=False, prefetch_step=1),
    "checkpoint": dict(source="checkpoint", mmap=False, prefetch_step=1),
}
CASES = [(f, t) for t in TIERS for f in FAMILIES]


@pytest.mark.parametrize("family, tier", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_families_and_tiers_are_bitwise_through_a_cache_small_enough_to_evict(tmp_path, family, tier):
    model = moe(family)
    ids = prompt()
    ref_logits, ref_tokens = run(model, ids)
    lookahead = (None, "previous", "router")[CASES.index((family, tier)) % 3]
    config = OffloadConfig(**tier_config(TIERS[tier], model, tmp_path), expert_lookahead=lookahead, expert_cache=12)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        _poison_slots(handle)
        logits, tokens = run(model, ids)
        e = handle.report().experts
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert e.cache_entries == 12 and e.cached > 0 and e.evictions > 0 and e.cached < e.sought <= e.misses


def _trace(model, ids) -> list[tuple[int, list[int]]]:
    """Per expert stack forward of `run` on the resident model: (layer, distinct experts chosen)."""
    out, hooks = [], []
    for i, layer in enumerate(model.model.layers):
        for stack in find_experts(layer):
            module = layer.get_submodule(stack.path)
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, k, i=i: out.append((i, sorted(set(routing_of(a, k).reshape(-1).tolist())))),
                with_kwargs=True))  # fmt: skip
    try:
        ref = run(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return out, ref


def _simulate(trace, entries: int, policy: str) -> dict:
    """The cache as specified, replayed over a routing trace: whole-stack forwards (more than half of the
    experts chosen) pass it by; every chosen expert is looked for, the found ones count as used, and each
    one not found takes an entry, evicting the least recently (lru) or least often (lfu) used of the keys
    the forward does not use, ties to the least recent."""
    held: OrderedDict = OrderedDict()
    uses: dict = {}
    sought = cached = evictions = 0
    for layer, chosen in trace:
        if len(chosen) > WHOLE_AT * EXPERTS:
            continue
        keys = [(layer, e) for e in chosen]
        sought += len(keys)
        for key in keys:
            if key in held:
                cached += 1
                held.move_to_end(key)
                uses[key] += 1
        for key in keys:
            if key in held:
                continue
            if len(held) == entries:
                spare = [k for k in held if k not in keys] or list(held)
                victim = spare[0] if policy == "lru" else min(spare, key=lambda k: uses[k])
                del held[victim], uses[victim]
                evictions += 1
            held[key], uses[key] = None, 1
    return dict(sought=sought, cached=cached, evictions=evictions)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
@pytest.mark.parametrize("entries", [TOP_K, 5, LAYERS * EXPERTS])
def test_hits_evictions_and_bytes_match_a_cache_replayed_over_the_routing(policy, entries):
    model = moe("mixtral")
    ids = prompt()
    trace, ref = _trace(model, ids)
    want = _simulate(trace, entries, policy)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1, experts=True)) as handle:
        _poison_slots(handle)
        run(model, ids)
        plain = handle.report().experts
    config = OffloadConfig(prefetch_step=1, expert_cache=entries, expert_cache_policy=policy)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        _poison_slots(handle)
        out = run(model, ids)
        e = handle.report().experts
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert dict(sought=e.sought, cached=e.cached, evictions=e.evictions) == want
    one = _expert_bytes(model)
    # each expert found in the cache is one expert's bytes less over the link, copied from the device instead
    assert e.cached_bytes == e.cached * one and plain.experts_moved - e.experts_moved == e.cached_bytes
    assert e.cache_bytes == entries * one and e.cache_hit_rate == e.cached / e.sought
    if entries == LAYERS * EXPERTS:
        assert e.evictions == 0 and e.cached == e.sought - len({(i, x) for i, c in trace
                                                                 if len(c) <= WHOLE_AT * EXPERTS for x in c})


def test_a_repeated_token_is_served_from_the_cache_and_the_lookahead_does_not_move_it_again():
    model = moe("qwen3_moe")
    token = prompt()[:, :1]
    with torch.inference_mode():
        ref = [model(token).logits for _ in range(3)]
    config = OffloadConfig(prefetch_step=1, expert_cache=LAYERS * TOP_K, expert_lookahead="previous")
    with weightlift.offload(model, device="cpu", config=config) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = [model(token).logits for _ in range(3)]
        e = handle.report().experts
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # the first forward moves every chosen expert over the link and caches it; the next two copy all from it
    assert e.sought == e.misses == 3 * LAYERS * TOP_K and e.cached == 2 * LAYERS * TOP_K and e.evictions == 0
    assert e.experts_moved == LAYERS * TOP_K * _expert_bytes(model)
    assert e.predicted == 0  # the guesses ("the experts of the last forward") are all in the cache


def test_a_cache_of_top_k_shared_by_every_layer_never_hits_and_evicts_each_time():
    model = moe("qwen3_moe")
    token = prompt()[:, :1]
    config = OffloadConfig(prefetch_step=1, expert_cache=TOP_K)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        with torch.inference_mode():
            for _ in range(3):
                model(token)
        e = handle.report().experts
    assert e.cached == 0 and e.evictions == 3 * LAYERS * TOP_K - TOP_K


def test_modulelist_and_quantized_experts_go_through_the_cache():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = ListModel().eval()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: ".experts." in f".{name}." and
              isinstance(m, torch.nn.Linear))  # fmt: skip
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        ref = [model(x) for _ in range(2)]
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1, expert_cache=8)) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = [model(x) for _ in range(2)]
        e = handle.report().experts
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and torchao is not None
    one = 48 * (32 + 4 + 1 + 4) + 32 * (48 + 4 + 1 + 4)  # an int8 expert as stored (see test_experts)
    assert e.cached == e.sought // 2 == 4 * 2 and e.experts_moved == 4 * 2 * one and e.cache_bytes == 8 * one


def test_the_report_counts_the_cache_in_the_pool_and_says_so():
    model = moe("olmoe")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        plain = handle.report()
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1, expert_cache=4)) as handle:
        with torch.inference_mode():
            model(prompt())
            model(prompt()[:, :1])
        report = handle.report()
    one = _expert_bytes(model)
    assert report.pool_bytes == plain.pool_bytes + 4 * one and report.device_bytes == report.resident_bytes + \
        report.pool_bytes  # fmt: skip
    assert "a cache of 4 experts" in str(report) and "looked for there found" in str(report)
    assert report.to_dict()["experts"]["cache_hit_rate"] == report.experts.cache_hit_rate


def test_a_size_holds_as_many_experts_as_fit():
    model = moe("olmoe")
    one = _expert_bytes(model)
    config = OffloadConfig(prefetch_step=1, expert_cache=f"{5 * one + one - 1}")
    with weightlift.offload(model, device="cpu", config=config) as handle:
        assert handle.experts.cache.entries == 5


def _cache_refusal(build, tmp_path, match, **kwargs):
    model = build()
    assert_refused(model, tmp_path, OffloadConfig(prefetch_step=1, **kwargs), match)


@pytest.mark.parametrize(
    "build, kwargs, match",
    [
        (lambda: moe("qwen3_moe"), dict(expert_cache=TOP_K - 1), rf"fewer than the {TOP_K} experts one token uses.*"
                                                                  rf"at least {TOP_K} \(expert_cache={TOP_K}"),
        (lambda: moe("qwen3_moe"), dict(expert_cache="1KiB"), rf"holds 0 experts.*at least {TOP_K}"),
        (lambda: tiny("llama"), dict(expert_cache=4), "no offloaded layer .* is streamed expert by expert"),
        (lambda: moe("qwen3_moe"), dict(expert_cache=4, params=("self_attn",)), "no offloaded layer"),
        (lambda: moe("qwen3_moe"), dict(expert_cache=4, source="disk"), "pass mmap=False"),
    ],
    ids=["fewer than top-k", "size below top-k", "dense model", "experts resident", "mapped tier"],
)  # fmt: skip
def test_refusals_name_the_minimum_and_leave_the_model_untouched(tmp_path, build, kwargs, match):
    if kwargs.get("source") == "disk":
        kwargs["disk_path"] = tmp_path
    _cache_refusal(build, tmp_path, match, **kwargs)


def test_lru_and_lfu_evict_differently():
    """Entries for A (used three times) and B (once); C needs one: lru evicts A (least recent), lfu B."""
    for policy, evicted in (("lru", "A"), ("lfu", "B")):
        cache = ExpertCache(2, 4, torch.device("cpu"), policy)
        first = cache.place("A")
        assert cache.entry("A") == first and cache.entry("A") == first
        cache.place("B")
        assert cache.place("C") is not None and evicted not in cache and "C" in cache and cache.evictions == 1
        assert cache.held()[-1] == "C"
    cache = ExpertCache(2, 4, torch.device("cpu"), "lru")
    cache.place("A"), cache.place("B")
    cache.place("C", keep={"A", "C"})  # the forward uses A: B goes although A is older
    assert cache.held() == ["A", "C"]


@pytest.mark.parametrize("bug", ["wrong entry", "never filled"])
def test_the_checker_reports_experts_copied_from_the_wrong_cache_entry(monkeypatch, bug):
    import simdevice
    from weightlift import expert_cache

    if bug == "wrong entry":
        real = expert_cache.ExpertCache.entry
        monkeypatch.setattr(expert_cache.ExpertCache, "entry", lambda self, key: None if (at := real(self, key)) is
                            None else (at + 1) % self.entries)  # fmt: skip
    else:
        from weightlift import apply

        real_copy = apply._SlotMover.copy_now
        monkeypatch.setattr(apply._SlotMover, "copy_now", lambda self, p, pairs: real_copy(
            self, p, [(d, s) for d, s in pairs if d.untyped_storage().data_ptr() in slots]))  # fmt: skip
    sim = simdevice.install(monkeypatch, copy_delay=0.001, compute_lag=0.0005)
    try:
        model = moe("qwen3_moe")
        token = prompt()[:, :1]
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1, expert_cache=16)) as handle:
            slots = {s.untyped_storage().data_ptr() for s in handle.pool.slots}
            sim.watch(handle)
            with torch.inference_mode():
                model(token)
                model(token)
            assert handle.report().experts.cached > 0
        sim.synchronize()
        assert any("experts read" in h and "that do not hold them" in h for h in sim.hazards)
    finally:
        sim.close()


def test_the_planner_gives_what_the_budget_leaves_to_a_cache_and_predicts_its_hits(tmp_path, monkeypatch):
    """A checkpoint whose fused experts are 8 bytes off alignment is read into slots on the CPU (not mapped),
    so a cache can serve it. The prediction is replaced by a cost per byte moved; the planner must give the
    budget's rest to the cache (at most the offloaded layers' experts), and net what a decode token moves of
    the share of its experts a cache replayed over the sample's tokens holds (checked with this file's own
    replay). The plan applies bitwise, with the memory it said."""
    import sys

    from test_experts import _safetensors
    from weightlift.measure import analyse

    model = moe("qwen3_moe")
    state = model.state_dict()
    (tmp_path / "ckpt").mkdir()
    _safetensors(tmp_path / "ckpt" / "model.safetensors", {"pad": torch.zeros(2), **state},
                 ["pad", *[k for k, v in state.items() if v.dim() >= 3]])  # fmt: skip
    module = sys.modules["weightlift.plan"]
    seen = []
    monkeypatch.setattr(module, "token_routes", lambda *a: seen.append(routes := module_routes(*a)) or routes)
    module_routes = sys.modules["weightlift.experts"].token_routes

    def predict(compute, other, moved, chosen, step, *rates):
        return 1.0 + 1e-6 * sum(moved[i] for i in chosen), [0.0] * len(compute)

    monkeypatch.setattr(sys.modules["weightlift.forecast"], "predict", predict)
    info = analyse(model)
    one = _expert_bytes(model)
    budget = info.total_bytes - 2 * EXPERTS * one // 3
    plan = weightlift.plan(model, device="cpu", budget=budget, checkpoint=tmp_path / "ckpt", reps=2)
    (routes,) = seen
    offloaded = [i for i in plan.offloaded if find_experts(model.model.layers[i])]
    assert offloaded and plan.expert_cache > 0 and plan.mmap is False and plan.device_bytes <= budget
    slots = plan.pool_bytes - plan.expert_cache_bytes
    assert plan.expert_cache == min(EXPERTS * len(offloaded), (budget - plan.resident_bytes - slots) // one)
    assert plan.expert_cache_bytes == plan.expert_cache * one
    # this file's replay, over the same tokens: per layer, the share of its experts the cache holds
    trace = [(layer, sorted(e for _, _, e in keys)) for layer, keys in routes if layer in offloaded]
    held: OrderedDict = OrderedDict()
    per: dict = {}
    for layer, chosen in trace:
        keys = [(layer, e) for e in chosen]
        found = [k for k in keys if k in held]
        for k in found:
            held.move_to_end(k)
        for k in keys:
            if k not in held:
                if len(held) == plan.expert_cache:
                    del held[next(x for x in held if x not in keys)]
                held[k] = None
        sought, hit = per.get(layer, (0, 0))
        per[layer] = (sought + len(keys), hit + len(found))
    dense = 0 if plan.params == ["experts"] else info.nbytes[offloaded[0]] - EXPERTS * one  # experts only: none
    for i in offloaded:
        routed = TOP_K * one  # a decode token's experts (random routers choose 2 distinct)
        sought, hit = per[i]
        assert plan.moved("decode")[i] == dense + routed - round(hit / sought * routed)
    assert plan.expert_cache_hit_rate == sum(h for _, h in per.values()) / sum(s for s, _ in per.values())
    assert "device expert cache" in plan.summary(), plan.summary()
    again = weightlift.Plan.from_json(plan.to_json())
    assert again == plan and again.config().expert_cache == plan.expert_cache
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", plan=again) as handle:
        out = run(model, ids)
        report = handle.report()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert report.resident_bytes + report.pool_bytes == plan.device_bytes
    assert report.experts.cache_entries == plan.expert_cache and report.experts.cached > 0
