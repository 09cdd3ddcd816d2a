"""Mixture-of-experts layers streamed expert by expert (`weightlift.experts`).

Every run is compared bit for bit with the resident model (logits and 8 greedy tokens with the KV cache).
The slot tests first fill every device slot with 0xFF bytes (NaN in every float dtype) and forget what the
slots held: an expert whose bytes were not moved but were read anyway would turn the output into NaN.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import weightlift
from conftest import VOCAB, assert_outputs_equal, assert_same, hook_counts, prompt, run, snapshot, tiny
from weightlift import OffloadConfig, OffloadError
from weightlift.experts import find_experts

LAYERS, EXPERTS, TOP_K = 4, 8, 2
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=LAYERS, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip


def _config(family: str):
    import transformers as tf

    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                 moe_intermediate_size=32, head_dim=16)  # fmt: skip
    if family == "qwen2_moe":  # a shared expert beside the routed ones
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=128, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=48)  # fmt: skip
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=TOP_K)
    if family == "deepseek_v3":  # shared experts, grouped routing, a first dense layer
        return tf.DeepseekV3Config(**COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=EXPERTS,
                                   num_experts_per_tok=TOP_K, n_shared_experts=1, n_group=2, topk_group=1,
                                   first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16)  # fmt: skip
    if family == "gpt_oss":  # biases on the experts, a router with a bias
        return tf.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
                               head_dim=16, sliding_window=8)  # fmt: skip
    raise AssertionError(family)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]


def moe(family: str, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(_config(family)).eval()


def _poison_slots(handle: weightlift.OffloadHandle) -> None:
    """Every slot 0xFF (NaN), and the prefetcher told they hold nothing: every layer is loaded again."""
    handle.prefetcher.settle()
    for slot in handle.pool.slots:
        slot.fill_(0xFF)
    for slot in handle.prefetcher.slots:
        slot.position, slot.ticket = None, None


def _expert_bytes(model: nn.Module) -> int:
    """Bytes of one expert, by hand: its slice of each expert tensor of the first MoE layer."""
    stack = next(s for layer in model.model.layers for s in find_experts(layer))
    module = next(layer for layer in model.model.layers if find_experts(layer)).get_submodule(stack.path)
    return sum(p[0].numel() * p.element_size() for p in module.parameters())


TIERS = {
    "host": dict(prefetch_step=1),  # one slot for 4 layers: it holds another layer every time
    "disk mapped": dict(source="disk"),
    "disk read": dict(source="disk", mmap=False, prefetch_step=1),
    "checkpoint": dict(source="checkpoint", prefetch_step=1),  # save_pretrained's per-expert files: read, not mapped
}
LOOKAHEAD = [None, "previous", "router"]


def tier_config(how: dict, model: nn.Module, tmp_path) -> dict:
    """The config keywords of a tier of `TIERS` (or alike), with its folder: a disk tier's cache folder, or
    the model saved by ``save_pretrained`` for the checkpoint tier."""
    how = dict(how)
    if how.get("source") == "disk":
        how["disk_path"] = tmp_path
    elif how.get("source") == "checkpoint":
        model.save_pretrained(tmp_path / "ckpt")
        how["disk_path"] = tmp_path / "ckpt"
    return how


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tier", list(TIERS))
def test_families_and_tiers_are_bitwise(tmp_path, family, tier):
    model = moe(family)
    ids = prompt()
    ref_logits, ref_tokens = run(model, ids)
    how = tier_config(TIERS[tier], model, tmp_path)
    lookahead = LOOKAHEAD[(FAMILIES.index(family) + list(TIERS).index(tier)) % 3]
    with weightlift.offload(model, device="cpu", config=OffloadConfig(**how, expert_lookahead=lookahead)) as handle:
        if handle.pool.slots:
            _poison_slots(handle)
        logits, tokens = run(model, ids)
        report = handle.report()
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    e = report.experts
    moe_layers = LAYERS - (1 if family == "deepseek_v3" else 0)
    assert (e.stacks, e.experts) == (moe_layers, moe_layers * EXPERTS)
    assert e.used == e.hits + e.misses and e.misses > 0
    assert e.routed > 0 and e.whole + e.routed == moe_layers * (1 + 1 + 7)  # a forward, a prefill, 7 decode steps
    if lookahead is None:
        assert e.predicted == 0
    else:
        assert 0 < e.predicted_used <= e.predicted


def test_decode_moves_the_dense_parts_and_the_chosen_experts_only():
    model = moe("qwen3_moe")
    ids = prompt()
    chosen = []  # distinct experts per layer in the prompt's forward, from the resident model
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda m, args: chosen.append(len(args[1].unique())))
             for layer in model.model.layers]  # fmt: skip
    with torch.inference_mode():
        ref = model(ids, use_cache=True)
    for h in hooks:
        h.remove()
    with torch.inference_mode():
        step = ref.logits[:, -1:].argmax(-1)
        ref_next = model(step, past_key_values=ref.past_key_values).logits
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            assert torch.equal(out.logits, ref.logits)
            before = handle.report().experts
            _poison_slots(handle)  # nothing in place: this token moves all it needs
            nxt = model(step, past_key_values=out.past_key_values).logits
        after = handle.report().experts
    assert torch.equal(nxt, ref_next)
    one = _expert_bytes(model)
    assert one == (2 * 32 * 64 + 64 * 32) * 4  # gate_up [2I, H] and down [H, I] in float32, by hand
    assert after.experts_moved - before.experts_moved == LAYERS * TOP_K * one
    # every layer's dense part once, and the first layer's once more: prefetched for the next forward
    assert after.dense_moved - before.dense_moved == after.dense_bytes // LAYERS * (LAYERS + 1)
    assert after.misses - before.misses == LAYERS * TOP_K and after.tokens - before.tokens == 1
    # the 12-token prompt moved whole stacks where it chose more than half of the 8 experts
    assert 0 < before.whole == sum(n > EXPERTS // 2 for n in chosen) and before.routed == LAYERS - before.whole


def test_whole_layers_with_experts_none_move_every_byte():
    model = moe("qwen3_moe")
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(experts=None, prefetch_step=1)) as handle:
        out = run(model, ids)
        report = handle.report()
    assert report.experts is None
    assert_outputs_equal(out, ref)


def test_the_previous_lookahead_finds_a_repeated_token_in_place():
    model = moe("mixtral")
    ids = prompt()
    with torch.inference_mode():
        ref = [model(ids[:, :1]).logits for _ in range(3)]
    config = OffloadConfig(prefetch_step=1, expert_lookahead="previous")
    with weightlift.offload(model, device="cpu", config=config) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = [model(ids[:, :1]).logits for _ in range(3)]
        e = handle.report().experts
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    # the same token routes alike: after the first forward every expert it uses was moved ahead
    assert e.misses == LAYERS * TOP_K and e.hits == 2 * LAYERS * TOP_K
    # and the first layer's guess for a fourth forward, which never came, is the only one unused
    assert e.predicted_used == 2 * LAYERS * TOP_K and e.predicted == e.predicted_used + TOP_K


class ListMoE(nn.Module):
    """Experts kept as a ModuleList of MLPs, called one by one for their tokens, beside a shared expert."""

    def __init__(self, hidden: int = 32, experts: int = 6, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, 48), nn.GELU(), nn.Linear(48, hidden)) for _ in range(experts)
        )
        self.shared = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.gate(flat).softmax(-1).topk(self.k, dim=-1)
        out = self.shared(flat)
        for e in chosen.unique().tolist():
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            out = out.index_add(0, rows, self.experts[e](flat[rows]) * weights[rows, slot, None])
        return out.reshape(x.shape)


class ListModel(nn.Module):
    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ListMoE() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_modulelist_experts_move_one_by_one_as_they_are_called():
    torch.manual_seed(0)
    model = ListModel().eval()
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        ref = model(x)
    (stack,) = find_experts(model.layers[0])
    assert (stack.path, stack.count, stack.fused, stack.router) == ("experts", 6, False, "gate")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = model(x)
        e = handle.report().experts
    assert torch.equal(out, ref)
    one = sum(p.numel() * 4 for p in model.layers[0].experts[0].parameters())
    assert e.used == e.misses == 4 * 2  # one token, two experts per layer
    assert e.experts_moved == 4 * 2 * one


def test_quantized_experts_stream_as_stored():
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = ListModel().eval()
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: ".experts." in f".{name}." and
              isinstance(m, nn.Linear))  # fmt: skip
    assert type(model.layers[0].experts[0][0].weight).__module__.startswith("torchao")
    x = torch.randn(1, 3, 32)
    chosen: list[int] = []  # distinct experts each layer's tokens choose, seen on the resident model
    hooks = [layer.gate.register_forward_hook(lambda m, a, out: chosen.append(out.topk(2, -1)[1].unique().numel()))
             for layer in model.layers]  # fmt: skip
    with torch.inference_mode():
        ref = model(x)
    for h in hooks:
        h.remove()
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = model(x)
        e = handle.report().experts
    assert torch.equal(out, ref) and torchao is not None
    # an int8 Linear(i, o) holds qdata o*i int8, a scale o x 1 float32, a zero point o x 1 int8, a bias o float32
    one = 48 * (32 + 4 + 1 + 4) + 32 * (48 + 4 + 1 + 4)
    assert len(chosen) == 4 and e.used == e.misses == sum(chosen)  # each chosen expert moved once, when called
    assert e.experts_moved == sum(chosen) * one


@pytest.mark.parametrize("name", ["mlp.experts", "*.experts", ("mlp.experts", "*.experts")])
def test_experts_can_be_named(name):
    """A path inside the layer, an fnmatch pattern, or a tuple of them (lookahead off unless asked)."""
    assert OffloadConfig().experts == "auto" and OffloadConfig().expert_lookahead is None
    model = moe("olmoe")
    ids = prompt()
    ref = run(model, ids)
    config = OffloadConfig(experts=name, prefetch_step=1)
    with weightlift.offload(model, device="cpu", config=config) as handle:
        out = run(model, ids)
        assert handle.report().experts.stacks == LAYERS
    assert_outputs_equal(out, ref)


@pytest.mark.parametrize(
    "build, experts, message",
    [
        (lambda: moe("qwen3_moe"), "self_attn", "is not a stack of experts"),
        (lambda: moe("qwen3_moe"), "mlp.nothing", "names no module"),
        (lambda: tiny("llama"), True, "the model is dense"),
        (lambda: tiny("llama"), "mlp", "is not a stack of experts"),
    ],
    ids=["not a stack", "no such module", "dense model", "dense mlp named"],
)
def test_refusals_leave_the_model_untouched(build, experts, message):
    model = build()
    snap, hooks = snapshot(model), hook_counts(model)
    with pytest.raises(OffloadError, match=message):
        weightlift.offload(model, device="cpu", config=OffloadConfig(experts=experts))
    assert_same(model, snap, same_storage=True)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(experts=3), "`experts` must be"), (dict(experts=("",)), "`experts` must be"),
     (dict(expert_lookahead="next"), "`expert_lookahead` must be"),
     (dict(expert_cache=0), "`expert_cache` must be"), (dict(expert_cache=True), "`expert_cache` must be"),
     (dict(expert_cache=2.5), "`expert_cache` must be"), (dict(expert_cache="lots"), "`expert_cache`='lots' is not"),
     (dict(expert_cache=4, experts=None), "`experts`=None moves whole layers"),
     (dict(expert_cache_policy="fifo"), "`expert_cache_policy` must be")],
)  # fmt: skip
def test_bad_expert_settings_are_refused(kwargs, message):
    with pytest.raises(OffloadError, match=message):
        OffloadConfig(**kwargs)


def test_detection_ignores_dense_layers_and_keeps_shared_experts_dense():
    model = moe("deepseek_v3")
    assert find_experts(model.model.layers[0]) == []  # first_k_dense_replace=1
    (stack,) = find_experts(model.model.layers[1])
    assert (stack.path, stack.count, stack.fused, stack.router) == ("mlp.experts", EXPERTS, True, "mlp.gate")
    assert find_experts(tiny("llama").model.layers[0]) == []


@pytest.mark.parametrize("cache", [None, TOP_K + 1], ids=["no cache", "expert cache"])
@pytest.mark.parametrize("lookahead", [None, "previous"])
@pytest.mark.parametrize("source", ["host", "disk"])
def test_expert_loads_on_the_accelerator_path_pass_the_ordering_checker(monkeypatch, tmp_path, source, lookahead,
                                                                        cache):  # fmt: skip
    """With a device expert cache (`weightlift.expert_cache`) too, small enough to evict: its copies into and
    out of slots are followed by byte range (the checker carries what a device buffer holds)."""
    import simdevice

    sim = simdevice.install(monkeypatch, copy_delay=0.001, compute_lag=0.0005, read_delay=0.001)
    try:
        model = moe("qwen3_moe")
        ids = prompt()
        ref_logits, ref_tokens = run(model, ids)
        how = dict(source="disk", disk_path=tmp_path) if source == "disk" else {}
        config = OffloadConfig(prefetch_step=1, expert_lookahead=lookahead, expert_cache=cache, **how)
        with weightlift.offload(model, device="cpu", config=config) as handle:
            assert handle.streams is not None  # the accelerator engines, on the simulated device
            sim.watch(handle)
            logits, tokens = run(model, ids)
            e = handle.report().experts
        sim.assert_clean()
    finally:
        sim.close()
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert sim.counts["expert_reads"] == LAYERS * 9 and e.misses > 0  # every expert stack's forward was checked
    if lookahead:
        assert e.predicted_used > 0
    if cache:
        assert e.cached > 0 and e.evictions > 0


def test_the_checker_reports_experts_read_before_they_are_moved(monkeypatch):
    import simdevice
    from weightlift import expert_streams

    monkeypatch.setattr(expert_streams.ExpertStreams, "_need", lambda self, position, s, chosen, whole: None)
    sim = simdevice.install(monkeypatch, copy_delay=0.001, compute_lag=0.0005)
    try:
        model = moe("qwen3_moe")
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
            sim.watch(handle)
            with torch.inference_mode():
                model(prompt())
        sim.synchronize()
        assert any("experts read" in h for h in sim.hazards)
    finally:
        sim.close()


def test_inspect_shows_dense_and_expert_bytes_and_what_a_token_reads(tmp_path, capsys):
    import json

    from weightlift.cli import main

    model = moe("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    one = (2 * 32 * 64 + 64 * 32) * 4  # by hand: gate_up [2I, H] and down [H, I], float32
    layer = model.model.layers[0]
    dense = sum(p.numel() * 4 for n, p in layer.named_parameters() if not n.startswith("mlp.experts."))
    for found in layers:
        assert found["experts"] == {"stacks": ["mlp.experts"], "count": EXPERTS, "bytes_per_expert": one,
                                    "dense_bytes": dense, "top_k": TOP_K,
                                    "routed_bytes_per_token": dense + TOP_K * one}  # fmt: skip


def test_compiled_moe_moves_experts_inside_the_graph():
    """fullgraph=True: the experts hook becomes the ``weightlift::experts`` op, so the compiled code moves
    the chosen experts each run; slots poisoned first, 2 slots for 4 layers (``aot_eager``: dynamo and
    functionalization as with inductor, without its minutes of code generation)."""
    model = moe("qwen3_moe")
    ids = prompt()
    with torch.inference_mode():
        ref = model(ids).logits  # aot_eager runs the eager kernels: the same bytes
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.inference_mode():
            compiled(ids)  # compiles
            _poison_slots(handle)
            before = handle.report().experts
            out = [compiled(ids).logits for _ in range(2)]
        after = handle.report().experts
    torch._dynamo.reset()
    assert all(torch.equal(o, ref) for o in out)
    # the op ran in the compiled code: once per stack per run, and it moved experts into the poisoned slots
    assert (after.routed + after.whole) - (before.routed + before.whole) == 2 * LAYERS
    assert after.misses > before.misses


def test_state_dict_of_an_offloaded_moe_is_the_resident_one():
    model = moe("gpt_oss")
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            model(prompt())
        got = model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


class RoutedBlock(nn.Module):
    """A residual block around fused ``experts(x, index)`` routed top-2 of 6 by a gate."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.gate = nn.Linear(32, 6, bias=False)
        self.experts = experts

    def forward(self, x):
        flat = x.reshape(-1, 32)
        return x + self.experts(flat, self.gate(flat).topk(2, dim=-1).indices).reshape(x.shape)


def test_custom_fused_experts_move_whole_unless_named():
    """A fused experts module weightlift does not know the forward of (it could read every expert) streams
    whole in auto mode; named, it streams expert by expert."""

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 32, 32))

        def forward(self, x, index):
            return torch.stack([x[t] @ self.w[index[t]].sum(0) for t in range(x.shape[0])])

    torch.manual_seed(0)
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(RoutedBlock(Fused()) for _ in range(4))

        def forward(self, x):
            for block in self.layers:
                x = block(x)
            return x

    model = Net().eval()
    assert find_experts(model.layers[0]) == []
    (named,) = find_experts(model.layers[0], "experts")
    assert (named.count, named.fused, named.router) == (6, True, "gate")
    x = torch.randn(1, 3, 32)
    with torch.inference_mode():
        ref = model(x)
    for experts, stacks in (("auto", None), ("experts", 4)):
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1, experts=experts)) as h:
            _poison_slots(h)
            with torch.inference_mode():
                out = model(x)
            report = h.report().experts
        assert torch.equal(out, ref)
        assert (report.stacks if report else None) == stacks


def test_a_leaf_of_the_whole_tensor_moves_with_the_dense_part(caplog):
    """Fused int8 experts whose weight is a tensor subclass: its ``qdata`` leads with the expert count and is
    cut per expert; its scale (one number for the whole tensor) is not, and moves with the dense part. The
    slots are poisoned: a scale left behind would be NaN whichever experts a token chose."""
    from test_quantized import Scaled

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = torch.randn(6, 32, 32)
            scale = w.abs().amax() / 127  # 0-dim: the whole tensor's
            self.w = nn.Parameter(Scaled(torch.round(w / scale).to(torch.int8), scale), requires_grad=False)

        def forward(self, x, index):  # reads only the chosen experts' int8 blocks, and the scale
            w = self.w
            return torch.stack([x[t] @ (w.qdata[index[t]].float() * w.scale).sum(0) for t in range(x.shape[0])])

    torch.manual_seed(0)
    model = nn.Sequential(*(RoutedBlock(Fused()) for _ in range(4))).eval()
    x = torch.randn(1, 1, 32)
    chosen = []
    hooks = [b.experts.register_forward_pre_hook(lambda m, args: chosen.append(args[1].unique().numel()))
             for b in model]  # fmt: skip
    with torch.inference_mode():
        ref = model(x)
    for h in hooks:
        h.remove()
    config = OffloadConfig(prefetch_step=1, experts="experts")
    with caplog.at_level("INFO", "weightlift"), weightlift.offload(model, device="cpu", config=config) as handle:
        _poison_slots(handle)
        with torch.inference_mode():
            out = model(x)
        e = handle.report().experts
    assert torch.equal(out, ref)
    assert all(f"`{i}.experts.w` is not split by expert" in caplog.text for i in range(4))
    assert chosen == [2] * 4 and e.used == e.misses == 8
    assert e.experts_moved == 8 * 32 * 32  # int8 blocks only: the scale is not any expert's
    assert e.expert_bytes == 4 * 6 * 32 * 32


def test_the_planner_counts_the_bytes_a_decode_token_moves(tmp_path):
    model = moe("qwen3_moe")
    from weightlift.measure import analyse

    info = analyse(model)
    plan = weightlift.plan(model, device="cpu", budget=info.minimum_bytes, disk_path=tmp_path, reps=2)
    assert plan.offloaded == list(range(LAYERS))
    one = (2 * 32 * 64 + 64 * 32) * 4  # one expert by hand
    # one decode token chooses TOP_K distinct experts per layer: the rest of each layer's experts stay put
    assert plan.moved("decode") == [b - (EXPERTS - TOP_K) * one for b in plan.layer_bytes]
    assert all(b - (EXPERTS - TOP_K) * one <= m <= b for m, b in zip(plan.moved("prefill"), plan.layer_bytes))
    again = weightlift.Plan.from_json(plan.to_json())
    assert again.moved_bytes == plan.moved_bytes
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", plan=plan) as handle:
        out = run(model, ids)
        assert handle.report().experts.stacks == LAYERS
    assert_outputs_equal(out, ref)


@pytest.mark.parametrize("source", ["host", "disk"])
def test_dense_parts_resident_and_experts_streamed(tmp_path, source):
    """``params=("experts",)`` keeps attention, norms and routers resident: only experts stream."""
    model = moe("mixtral")
    ids = prompt()
    ref = run(model, ids)
    how = dict(source="disk", disk_path=tmp_path, mmap=False) if source == "disk" else {}
    config = OffloadConfig(params=("experts",), prefetch_step=1, **how)
    with weightlift.offload(model, device="cpu", config=config) as h:
        _poison_slots(h)
        out = run(model, ids)
        report = h.report()
    assert_outputs_equal(out, ref)
    e = report.experts
    assert e.dense_bytes < 512 * LAYERS and e.expert_bytes == LAYERS * EXPERTS * _expert_bytes(model)
    assert report.offloaded_bytes == e.expert_bytes


@pytest.mark.parametrize("per_byte", [1e-6, 1e-12], ids=["bytes-cost-time", "bytes-nearly-free"])
def test_the_planner_keeps_dense_parts_resident_when_that_moves_fewer_bytes_in_time(tmp_path, monkeypatch, per_byte):
    """Two ways to offload a MoE layer: whole, or its experts only with the dense part resident. With the
    prediction replaced by a cost of the bytes a decode token moves, experts only wins where those bytes
    cost time (it moves no dense part); where they are nearly free the 2% tie keeps whole layers."""
    import sys

    from weightlift.measure import analyse

    model = moe("qwen3_moe")

    def predict(compute, other, moved, chosen, step, *rates):
        return 1.0 + per_byte * sum(moved[i] for i in chosen), [0.0] * len(compute)

    monkeypatch.setattr(sys.modules["weightlift.forecast"], "predict", predict)  # the planner's and the Plan's
    info = analyse(model)
    budget = info.total_bytes - 1  # something must go: two layers of either kind (a slot is at least its layer)
    plan = weightlift.plan(model, device="cpu", budget=budget, disk_path=tmp_path, reps=2)
    one = (2 * 32 * 64 + 64 * 32) * 4  # one expert by hand
    assert len(plan.offloaded) == 2 and plan.device_bytes <= budget
    if per_byte > 1e-9:
        assert plan.params == ["experts"] and "only their experts" in plan.summary()
        # a decode token moves its TOP_K experts per offloaded layer, nothing of the dense parts
        assert [plan.moved("decode")[i] for i in plan.offloaded] == [TOP_K * one] * 2
        assert all(plan.layer_bytes[i] >= EXPERTS * one for i in plan.offloaded)
    else:
        assert plan.params == [] and plan.layer_bytes == info.nbytes
    again = weightlift.Plan.from_json(plan.to_json())
    assert again.params == plan.params and again.config() == plan.config()
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", plan=again) as handle:
        out = run(model, ids)
        report = handle.report()
    assert_outputs_equal(out, ref)
    assert report.resident_bytes + report.pool_bytes == plan.device_bytes
    expert_only = report.experts.expert_bytes == report.offloaded_bytes == 2 * EXPERTS * one
    assert expert_only == (per_byte > 1e-9)


def test_experts_that_cannot_go_alone_leave_the_planner_whole_layers(tmp_path, monkeypatch):
    """Where sizing the experts-only way fails (a tensor of the experts that cannot travel alone), the planner
    weighs whole layers only instead of failing."""
    import sys

    from weightlift.measure import analyse

    module = sys.modules["weightlift.plan"]
    real = module.analyse

    def refusing(model, layers=None, adapters=(), params=()):
        if params:
            raise OffloadError("`mlp.experts.gate_up_proj` cannot travel alone")
        return real(model, layers, adapters, params)

    monkeypatch.setattr(module, "analyse", refusing)
    model = moe("qwen3_moe")
    plan = weightlift.plan(model, device="cpu", budget=analyse(model).total_bytes - 1, disk_path=tmp_path, reps=2)
    assert plan.params == [] and plan.offloaded


def test_the_router_lookahead_counts_its_router_copies_as_resident():
    model = moe("qwen3_moe")
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as plain:
        base = plain.report().resident_bytes
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1, expert_lookahead="router")) as h:
        extra = h.report().resident_bytes - base
    assert extra == LAYERS * EXPERTS * 64 * 4  # one [E, H] float32 router weight per layer, by hand


def test_bfloat16_experts_are_bitwise():
    model = moe("qwen2_moe").to(torch.bfloat16)
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        _poison_slots(handle)  # 0xFFFF is NaN in bfloat16 too
        out = run(model, ids)
        assert handle.report().experts.misses > 0
    assert_outputs_equal(out, ref)


def _every_expert(self, hidden, top_k_index, top_k_weights):
    """An experts forward that reads every expert (weight zero for the unchosen): what weightlift must not
    stream expert by expert."""
    out = torch.zeros_like(hidden)
    for e in range(self.num_experts):
        weight = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
        gate, up = torch.nn.functional.linear(hidden, self.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + weight * torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
    return out


def test_an_experts_implementation_changed_after_offload_moves_whole_stacks():
    import copy

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("weightlift_test_every_expert", _every_expert)
    model = moe("olmoe")
    ids = prompt()[:, :1]  # one token: two experts chosen per layer, the rest would not move
    dense = copy.copy(model.config)
    dense._experts_implementation_internal = "weightlift_test_every_expert"
    assert dense._experts_implementation == "weightlift_test_every_expert"

    def use(config):
        for layer in model.model.layers:
            layer.mlp.experts.config = config

    original = model.config
    use(dense)
    with torch.inference_mode():
        ref = model(ids).logits
    use(original)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        use(dense)  # as set_experts_implementation would, after offload, to a forward weightlift does not know
        _poison_slots(handle)
        before = handle.report().experts
        with torch.inference_mode():
            logits = model(ids).logits
        after = handle.report().experts
        use(original)
    assert torch.equal(logits, ref)  # with only the chosen experts moved, the poisoned rest would give NaN
    assert after.whole - before.whole == LAYERS and after.routed == before.routed


def _safetensors(path, tensors: dict, first: list[str]) -> None:
    """A safetensors file with ``first``'s tensors at the start of the data, the header padded to 64 bytes:
    they sit at 64-byte offsets when their sizes are multiples of 64."""
    import json
    import struct

    names = first + [k for k in tensors if k not in first]
    header, at, blobs = {}, 0, []
    for name in names:
        t = tensors[name].contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(raw)]}
        at += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 64)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.parametrize("aligned", [True, False])
def test_a_fused_checkpoint_is_computed_on_in_place_only_when_64_byte_aligned(tmp_path, aligned):
    """A checkpoint holding the fused expert tensors as the model does. At 64-byte offsets they are
    computed on in place (mapped) and read ahead expert by expert; 8 bytes off, torch's CPU grouped_mm
    gives other bits, so they are read into slots instead. Both bitwise."""
    model = moe("qwen3_moe")
    ids = prompt()
    ref = run(model, ids)
    state = model.state_dict()
    stacks = [k for k, v in state.items() if v.dim() >= 3]
    (tmp_path / "ckpt").mkdir()
    if aligned:
        _safetensors(tmp_path / "ckpt" / "model.safetensors", state, stacks)
    else:  # a 1-D tensor of 2 floats first: every stack after it is 8 bytes off
        _safetensors(tmp_path / "ckpt" / "model.safetensors", {"pad": torch.zeros(2), **state}, ["pad", *stacks])
    config = OffloadConfig(source="checkpoint", disk_path=tmp_path / "ckpt")
    with weightlift.offload(model, device="cpu", config=config) as handle:
        assert handle.report().source.endswith("(mapped)") == aligned
        out = run(model, ids)
        e = handle.report().experts
    assert_outputs_equal(out, ref)
    assert e.stacks == LAYERS and e.routed > 0


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_each_experts_implementation_reads_only_the_moved_experts(implementation):
    """transformers' three CPU experts forwards, each with every slot poisoned (NaN) before the run and
    one slot for 4 layers: whatever an implementation read that was not moved would show in the logits."""
    model = moe("qwen3_moe")
    model.set_experts_implementation(implementation)
    assert model.model.layers[0].mlp.experts.config._experts_implementation == implementation
    ids = prompt()
    ref = run(model, ids)
    with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
        _poison_slots(handle)
        out = run(model, ids)
        e = handle.report().experts
    assert_outputs_equal(out, ref)
    assert e.routed > 0 and e.experts_moved < 9 * e.expert_bytes  # decode moved expert by expert, not whole stacks


def test_capturing_a_graph_of_expert_level_layers_is_refused_naming_the_fix(monkeypatch):
    """A replay would not repeat the router's choice: `cuda_graph` refuses, and names experts=None."""
    import simdevice

    sim = simdevice.install(monkeypatch)
    try:
        model = moe("qwen3_moe")
        ids = prompt()
        with torch.inference_mode():
            ref = model(ids).logits
        with weightlift.offload(model, device="cpu", config=OffloadConfig(prefetch_step=1)) as handle:
            assert handle.streams is not None and handle.streams.can_capture
            sim.watch(handle)  # the host computes a layer once the simulated device has reached it
            refused = pytest.raises(OffloadError, match=r"experts are moved as the router.*experts=None")
            with refused, torch.inference_mode(), handle.cuda_graph(simdevice.SimGraph()):
                model(ids)
            assert handle.experts is not None
            with torch.inference_mode():  # the handle still works eagerly
                assert torch.equal(model(ids).logits, ref)
    finally:
        sim.close()


def _read_bytes() -> int:
    """Bytes this process caused to be fetched from storage (the kernel's count, /proc/self/io)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def _dense_first(family: str) -> nn.Module:
    """A MoE whose first layer is dense, with experts of 192 KiB (many pages each)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=6, intermediate_size=256, num_experts_per_tok=2, moe_intermediate_size=128)
    if family == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**common, num_experts=16, head_dim=32, mlp_only_layers=[0])
    else:
        config = tf.DeepseekV3Config(**common, n_routed_experts=16, n_shared_experts=1, n_group=2, topk_group=1,
                                     first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                                     qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("tier", ["disk mapped", "disk read into slots", "checkpoint"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_cold_decode_token_reads_the_dense_parts_and_its_experts_from_disk(tmp_path, monkeypatch, family, tier):
    """Asked of the kernel: with the page cache emptied before each decode token, the bytes read from storage
    (/proc/self/io) are the offloaded layers' dense parts plus the top-k experts of each MoE layer, counted by
    hand from the model's parameters, within 1.15x. A dense first layer used to set the kernel's read-ahead
    going through nearly every expert of the layers after it (4.7x and 3.8x here on the mapped tier), and
    the sequential read-ahead of reads into slots read the experts beside each chosen one (1.5-1.9x read
    into slots and from a checkpoint), before `read_exactly`."""
    model = _dense_first(family)
    moe_layers = [layer for layer in model.model.layers if find_experts(layer)]
    assert 0 < len(moe_layers) < len(model.model.layers)  # a dense first layer
    stack = next(s for layer in moe_layers for s in find_experts(layer))
    expert = sum(p[0].numel() * p.element_size() for p in moe_layers[0].get_submodule(stack.path).parameters())
    layers_bytes = sum(t.numel() * t.element_size() for t in (*model.model.layers.parameters(),
                                                               *model.model.layers.buffers()))  # fmt: skip
    all_experts = len(moe_layers) * stack.count * expert
    needed = layers_bytes - all_experts + len(moe_layers) * 2 * expert  # dense parts + top-2 of each MoE layer
    folder = tmp_path / "files"
    if tier == "checkpoint":  # experts stored one tensor each and fused on load: read into slots
        model.save_pretrained(folder, max_shard_size="4MB")
        config = OffloadConfig(source="checkpoint", disk_path=str(folder), prefetch_step=1)
    else:  # mapped: a window of one layer (`weightlift.window`), as when RAM is short: no layer stays mapped
        largest = max(sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
                      for layer in model.model.layers)  # fmt: skip
        config = OffloadConfig(source="disk", disk_path=str(folder), prefetch_step=1, mmap=tier == "disk mapped",
                               host_budget=largest + (1 << 20) if tier == "disk mapped" else None)  # fmt: skip
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench import evict  # the benchmarks' page-cache drop: every file under a folder

    ids, tokens = prompt(), 4
    with weightlift.offload(model, device="cpu", config=config) as handle, torch.inference_mode():
        assert handle.report().layers_offloaded == len(model.model.layers)
        out = model(ids, use_cache=True)
        read = 0
        for _ in range(tokens):  # summed: a read-ahead into a slot may cross into the next token
            evict(folder)
            before = _read_bytes()
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
            read += _read_bytes() - before
    print(f"{family}, {tier}: a cold decode token read {read / tokens / needed:.2f}x its dense parts and experts")
    # at least 0.8x: the reads are really from storage (a slot filled ahead for the next token is read
    # before its window, so a token may count a little less)
    assert 0.8 * tokens * needed <= read <= 1.15 * tokens * needed, (read / tokens / needed, needed, all_experts)
