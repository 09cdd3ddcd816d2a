"""`weightlift generate FOLDER --budget ...` streams a model bigger than its budget from the checkpoint:
the process's peak RSS tracks the budget, not the model, and the answer is the resident one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_outputs_equal, save_tokenizer

BUDGET = 100 * 2**20
SLACK = 48 * 2**20
PROMPT = "w5 w17 w42 w9"


def _generate(folder, *extra: str) -> subprocess.Popen:
    """`weightlift generate FOLDER ... --json`, started (several run side by side: each reports its own peak)."""
    return subprocess.Popen(
        [sys.executable, "-m", "weightlift", "generate", str(folder), "--prompt", PROMPT, "--tokens", "6", "--json",
         "--device", "cpu", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "WEIGHTLIFT_CACHE": str(folder / "cache")},
    )  # fmt: skip


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _save(folder, config_cls, model_cls, **config) -> int:
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=256, bos_token_id=254, eos_token_id=255, tie_word_embeddings=False,
                                 **config)).eval()  # fmt: skip
    model.save_pretrained(folder)
    save_tokenizer(folder, 256)
    return sum(p.numel() * p.element_size() for p in model.parameters())


LLAMA = {"num_attention_heads": 8, "num_key_value_heads": 8}
MIXTRAL = {"num_attention_heads": 8, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2}
CASES = {
    # family: (classes, small config, big config, least bytes of the big one)
    "llama": ("Llama", {**LLAMA, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3},
              {**LLAMA, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8}, 400e6),
    "mixtral": ("Mixtral", {**MIXTRAL, "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 4},
                {**MIXTRAL, "hidden_size": 512, "intermediate_size": 512, "num_hidden_layers": 11}, 300e6),
}  # fmt: skip


@pytest.mark.parametrize("family", list(CASES))
def test_generate_with_a_budget_peaks_near_the_budget_not_the_model(tmp_path, family):
    import transformers as tf

    prefix, small_config, big_config, least = CASES[family]
    classes = getattr(tf, f"{prefix}Config"), getattr(tf, f"{prefix}ForCausalLM")
    small, big = tmp_path / "small", tmp_path / "big"
    _save(small, *classes, **small_config)
    assert _save(big, *classes, **big_config) >= least
    runs = [_generate(small, "--budget", "100MiB"), _generate(big), _generate(big, "--budget", "100MiB")]
    baseline, resident, streamed = map(_result, runs)
    assert streamed["layers_offloaded"] > 0 and baseline["layers_offloaded"] == 0
    assert streamed["text"] == resident["text"]
    if family == "mixtral":  # streamed expert by expert: the prompt moved whole stacks, decode tokens their top-2
        e = streamed["experts"]
        assert e["stacks"] == streamed["layers_offloaded"] and e["routed"] > 0 and e["misses"] > 0
    assert streamed["peak_rss_bytes"] <= baseline["peak_rss_bytes"] + BUDGET + SLACK, (streamed, baseline)
    assert resident["peak_rss_bytes"] > streamed["peak_rss_bytes"] + 200e6  # the model would not have fit
    runs = {"streamed": streamed, "small": baseline, "resident": resident}
    mib = {k: round(v["peak_rss_bytes"] / 2**20) for k, v in runs.items()}
    print(f"{family}: peak RSS (MiB) {mib}")


def test_a_folder_streamed_in_another_dtype_is_converted_once_and_equals_loading_it_so(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import prompt, run, tiny
    from weightlift import OffloadConfig
    from weightlift.cache import entries
    from weightlift.hf import load_streaming, model_folder

    source, cache = tmp_path / "model", tmp_path / "cache"
    tiny("qwen3", layers=4).save_pretrained(source, max_shard_size="100KB")
    assert model_folder(str(source), dtype=torch.float32, cache_dir=cache, stream=True) == source  # as saved
    folder = model_folder(str(source), dtype=torch.bfloat16, cache_dir=cache, stream=True)
    assert folder.parent == cache / "converted"
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert model_folder(str(source), dtype=torch.bfloat16, cache_dir=cache, stream=True) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != ".used"} == {
        k: v for k, v in written.items() if k != ".used"}  # reused, not written again
    [entry] = entries(cache)
    assert entry.kind == "converted model" and entry.dtype == "bfloat16"
    resident = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    ids = prompt()
    ref = run(resident, ids)
    model, handle = load_streaming(folder, config=OffloadConfig(prefetch_step=1))
    with handle:
        assert handle.report().layers_offloaded == 4
        out = run(model, ids)
    assert_outputs_equal(out, ref)


def test_planning_empty_layers_streams_them_and_leaves_them_empty(tmp_path):
    """`plan(checkpoint=)` on a model whose layers were never read: measured streamed (a few layers read
    for a moment), the layers are on the meta device again afterwards, and the plan streams from the folder."""
    import weightlift
    from conftest import prompt, run, tiny
    from weightlift.hf import load_outside_layers, load_streaming
    from weightlift.measure import analyse

    resident = tiny("llama", layers=6)
    ref = run(resident, prompt())
    resident.save_pretrained(tmp_path)
    info = analyse(resident)
    budget = info.other_bytes + 3 * max(info.nbytes)
    model, _, _ = load_outside_layers(tmp_path)
    plan = weightlift.plan(model, device="cpu", budget=budget, checkpoint=tmp_path, reps=3)
    assert all(p.is_meta for p in model.model.layers.parameters())  # as it was
    assert not any(p.is_meta for p in model.model.embed_tokens.parameters())
    assert plan.source == "checkpoint" and plan.disk_path == str(tmp_path) and plan.offloaded
    assert plan.device_bytes <= budget
    streamed, handle = load_streaming(tmp_path, plan=plan)
    with handle:
        assert handle.report().device_bytes <= budget
        out = run(streamed, prompt())
    assert_outputs_equal(out, ref)


@pytest.mark.parametrize("fit", [1, 3, 5])
def test_planning_empty_layers_reads_as_many_layers_as_fit_the_budget(tmp_path, monkeypatch, fit):
    """The mapping is priced on layers read into memory for a moment: as many as the budget leaves room for
    beside the weights outside the layers (at least one), never more."""
    from safetensors.torch import load_file

    import weightlift
    from conftest import tiny
    from weightlift import checkpoint, measure
    from weightlift.checkpoint import save_aligned
    from weightlift.hf import load_outside_layers

    resident = tiny("llama", layers=6)
    resident.save_pretrained(tmp_path)  # then laid out to be mapped in place: only then is the mapping priced
    state = {k: v.clone() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}  # off the mapping
    save_aligned(state, tmp_path / "model.safetensors", {"format": "pt"})
    info = measure.analyse(resident)
    layer = max(info.nbytes)
    assert set(info.nbytes) == {layer}  # six layers of one size
    model, _, _ = load_outside_layers(tmp_path)
    held: list[int] = []  # layers read into memory, each time some are
    load = checkpoint.load_meta

    def counting(model_, index, keep):
        names = [n for n, p in model_.named_parameters() if p.is_meta and keep(n)]
        held.append(len({n.split(".")[2] for n in names if n.startswith("model.layers.")}))
        assert len(names) == sum(1 for n, _ in model_.named_parameters() if keep(n))  # only empty ones read
        return load(model_, index, keep=keep)

    monkeypatch.setattr(checkpoint, "load_meta", counting)
    budget = info.other_bytes + fit * layer + layer // 2  # room for `fit` layers and half of another
    weightlift.plan(model, device="cpu", budget=budget, checkpoint=tmp_path, reps=2)
    assert held == [fit]  # read in once, for the one timing of them resident (the other timings map them)
    assert all(p.is_meta for p in model.model.layers.parameters())
