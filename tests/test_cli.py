"""The CLI through a subprocess: help, JSON, plots, and user errors as one line with a non-zero exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny

SRC = Path(__file__).resolve().parents[1] / "src"


def _cli(*args: str, cwd=None, path_first: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m weightlift ARGS`` with this worktree's sources (``path_first`` ahead of them)."""
    pythonpath = os.pathsep.join(str(p) for p in (path_first, SRC) if p is not None)
    return subprocess.run([sys.executable, "-m", "weightlift", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath}, cwd=cwd)  # fmt: skip


def _save_tokenizer(folder: Path, words: int) -> None:
    """A WordLevel tokenizer of ``words`` entries ('w3' has id 3 ...), no chat template: the prompt is plain text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>").save_pretrained(
        folder
    )


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """The run failed as a user error: exit 2, stderr exactly one non-empty line `weightlift: error: ...`."""
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert len(lines) == 1 and lines[0].startswith("weightlift: error: "), out.stderr[-3000:]
    return lines[0]


def test_help_and_version():
    out = _cli("--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout
    for command in ("demo", "bench", "inspect", "plan", "generate"):
        assert command in out.stdout
    version = _cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"weightlift \S+ \(torch \S+\)\n", version.stdout)


def test_start_up_imports_no_compiler():
    """Importing weightlift and its command line leaves dynamo and inductor unimported: they take seconds,
    and only a model being compiled needs them (a decorator at import once added 2.5 s to every command)."""
    code = ("import sys, weightlift, weightlift.cli; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_option_of_every_command_has_help_and_examples():
    import argparse

    from weightlift.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in [("weightlift", parser), *sub.choices.items()]:
        assert command.epilog and command.epilog.startswith("examples:"), name
        assert "usage:" in command.format_help()
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny("llama", layers=6).save_pretrained(path)
    _save_tokenizer(path, 100)  # the model's vocabulary has 128
    return path


def test_inspect_json_lists_layers_and_what_fits(folder):
    out = _cli("inspect", str(folder), "--budget", "600KiB", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["stacks"] == ["model.layers"] and len(result["layers"]) == 6
    assert all(layer["formats"] == ["float32"] and layer["bytes"] > 0 for layer in result["layers"])
    budget = result["budget"]
    assert budget["possible"] and not budget["everything_fits"]
    room = 600 * 1024 - result["minimum_budget_bytes"]
    assert budget["resident_layers_at_most"] == min(6, room // result["layers"][0]["bytes"])


def test_plan_json_parses_saves_and_respects_the_budget(folder, tmp_path):
    out = _cli("plan", str(folder), "--budget", "600KiB", "--cache-dir", str(tmp_path), "--json",
               "--out", str(tmp_path / "plan.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["resident_bytes"] + plan["pool_bytes"] <= 600 * 1024 and plan["offloaded"]
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    # the saved plan is what `generate --plan` applies: its layers offloaded, no measuring
    gen = _cli("generate", str(folder), "--plan", str(tmp_path / "plan.json"), "--prompt", "w3 w4", "--tokens", "2",
               "--cache-dir", str(tmp_path), "--json")  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
    generated = json.loads(gen.stdout)
    assert generated["new_tokens"] == 2 and generated["layers_offloaded"] == len(plan["offloaded"])
    # without --json, `plan` prints the plan as text (`str(Plan)`): read back from the JSON here, not measured again
    from weightlift import Plan

    text = str(Plan.from_json((tmp_path / "plan.json").read_text()))
    assert "predicted decode" in text and "model.layers.5" in text
    # the page-fault term is left out when it measured zero, which a fast page cache makes happen (CI once)
    _assert_terms_add_up(text, mapped=None)


def _assert_terms_add_up(summary: str, mapped: bool | None) -> None:
    """Each `predicted W: T ms per forward (...) = a ms X + b ms Y + ...` line names its terms, which sum to T
    (``mapped``: whether the page-fault term is there; None: either way, in its place if it is)."""
    rows = re.findall(r"^predicted (\w+): ([\d.]+) ms per forward \(\w+-bound\) = (.+)$", summary, re.M)
    assert {name for name, _, _ in rows} == {"prefill", "decode"}
    for _, total, terms in rows:
        parts = [re.fullmatch(r"([\d.]+) ms (.+)", t).groups() for t in terms.split(" + ")]
        names = [name for _, name in parts]
        if mapped is None:
            mapped = "mapped reads (page faults)" in names
        assert names == ["compute in layers", "elsewhere", *(["mapped reads (page faults)"] if mapped else []),
                         "exposed copy wait"]  # fmt: skip
        assert abs(sum(float(ms) for ms, _ in parts) - float(total)) <= 0.005 * len(parts) + 1e-9


def test_plan_summary_names_every_term_of_a_prediction():
    """A plan with offloaded layers mapped on the CPU, copies slower than compute: all four terms are non-zero."""
    from weightlift.plan import Plan, Workload

    n = 6
    plan = Plan(
        model="M", fingerprint="x", device="cpu", budget=10**6, host_budget=None, stacks=["model.layers"],
        layer_names=[f"model.layers.{i}" for i in range(n)], layer_bytes=[1000] * n, offloaded=[1, 3, 5],
        prefetch_step=1, source="disk", disk_path="/tmp/x", mmap=True, resident_bytes=5000, pool_bytes=1000,
        host_bytes=0, link="mapped", copy_bytes_per_s=2e5, serial_s_per_byte=3e-6, goal="decode",
        workloads={w: Workload(w, [0.002, 0.001, 0.003, 0.001, 0.002, 0.001], 0.004) for w in ("prefill", "decode")},
    )  # fmt: skip
    for w in plan.workloads.values():
        w.predicted_s, w.wait_s = plan.predict(w.compute_s, w.other_s)
        assert sum(w.wait_s) > 0
    _assert_terms_add_up(plan.summary(), mapped=True)
    assert all(ms > 0 for _, ms in plan.terms(plan.workloads["decode"]))


def test_bench_with_a_budget_reports_predicted_and_measured(folder, tmp_path):
    out = _cli("bench", str(folder), "--budget", "600KiB", "--cache-dir", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert set(result["forwards"]) == {"prefill", "decode"}
    for row in result["forwards"].values():
        assert row["predicted_s"] > 0 and row["measured_s"] > 0
    assert result["report"]["device_bytes"] <= 600 * 1024


def test_generate_streams_and_summarises(smollm2_converted):
    out = _cli("generate", "smollm2", "--budget", "300MiB", "--cache-dir", str(smollm2_converted[0]), "--prompt", "Hi!",
               "--tokens", "4")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()  # the streamed answer
    summary = [line for line in out.stderr.splitlines() if line.startswith("[") and "tokens/s" in line]
    assert len(summary) == 1 and "tokens/s" in summary[0] and "layers offloaded" in summary[0]
    assert re.search(r"first token after \d+\.\d\d s", summary[0])
    assert "it/s" not in out.stderr  # no progress bars when piped


def test_generate_json_has_first_token_time_plan_and_peak_rss(folder, tmp_path):
    out = _cli("generate", str(folder), "--prompt", "w5 w6 w7", "--tokens", "3", "--budget", "600KiB",
               "--cache-dir", str(tmp_path), "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["new_tokens"] == 3 and result["layers_offloaded"] > 0
    assert 0 < result["time_to_first_token_s"] < 3 / result["tokens_per_s"]  # the first of three tokens
    assert result["peak_rss_bytes"] > 100 * 2**20  # torch alone is more
    assert "predicted decode" in result["plan"]["summary"]
    assert set(result["plan"]["predicted_s_per_forward"]) == {"prefill", "decode"}


def test_a_second_generate_with_the_budget_reuses_the_measured_plan(folder, tmp_path, monkeypatch, capsys):
    from weightlift.cache import clear, entries
    from weightlift.cli import main

    args = ["generate", str(folder), "--prompt", "w5 w6 w7", "--tokens", "3", "--budget", "600KiB", "--device", "cpu",
            "--cache-dir", str(tmp_path), "--json"]  # fmt: skip
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    [entry] = [e for e in entries(tmp_path) if e.kind == "measured plan"]
    assert "LlamaForCausalLM" in entry.model

    def measured(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sys.modules["weightlift.plan"], "plan", measured)  # the module, not weightlift.plan()
    assert main(args) == 0  # nothing measured: the plan of the first run
    second = json.loads(capsys.readouterr().out)
    assert second["text"] == first["text"] and second["plan"] == first["plan"]
    assert clear(tmp_path, model="LlamaForCausalLM") and not entries(tmp_path)
    with pytest.raises(AssertionError, match="measured again"):  # cleared: the next run measures
        main(args)


@pytest.mark.parametrize("source", ["disk", "host", "checkpoint"])
def test_bench_json_and_plot_on_a_model_folder(tmp_path, source):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    folder = tmp_path / "model" if source == "checkpoint" else tmp_path / "cache"
    out = _cli("-v", "bench", str(tmp_path / "model"), "--tokens", "4", "--source", source, "--cache-dir", str(folder),
               "--json", "--plot", str(tmp_path / "t.png"), "--trace", str(tmp_path / "t.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"^loading .*model: \d+\.\d\d s$", out.stderr, re.M)  # -v: the CLI's phases, with seconds
    assert "layers of `model.layers` offloaded" in out.stderr  # and the library's own INFO lines
    result = json.loads(out.stdout)
    assert result["identical"] is True
    assert result["report"]["layers_offloaded"] == 5 and result["report"]["prefetch_misses"] == 0
    assert result["resident"]["decode_tokens_per_s"] > 0 and result["offloaded"]["decode_tokens_per_s"] > 0
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "/nonexistent/model"], "is neither 'smollm2', a .gguf file, nor a transformers model folder"),
        (["bench", "smollm2", "--prefetch-step", "-1"], "`--prefetch-step` must be >= 0"),
        (["bench", "smollm2", "--device", "gpu9"], "`--device`='gpu9' is not a device torch knows"),
        (["plan", "/nonexistent/model", "--budget", "1GiB"], "is neither 'smollm2', a .gguf file"),
        (["inspect", "/nonexistent/model"], "is neither 'smollm2', a .gguf file"),
        (["plan", "smollm2", "--budget", "lots"], "`--budget`='lots' is not a size"),
        (["inspect", "smollm2", "--budget", "12 parsecs"], "`--budget`='12 parsecs' is not a size"),
        (["generate", "smollm2", "--prompt", "x", "--budget", "1GiB", "--host-budget", "-"], "`--host-budget`='-'"),
        (["generate", "smollm2", "--prompt", "x", "--plan", "/nonexistent.json"], "`--plan`='/nonexistent.json'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, in_process, monkeypatch, capsys):
    """In this process (`main`, as the console script runs it), the model loaders patched to fail: each
    mistake is one line before any model is loaded. `test_a_user_error_from_the_console_is_one_line`
    runs one of them as a process."""
    _not_loaded(monkeypatch)
    assert message in _one_line_in_process(in_process, args, capsys)


def test_a_user_error_from_the_console_is_one_line():
    """``python -m weightlift``: exit 2, one line on stderr, no traceback."""
    out = _cli("plan", "smollm2", "--budget", "lots")
    assert "`--budget`='lots' is not a size" in _one_error_line(out)


def test_a_budget_below_the_minimum_is_one_line_stating_it(folder, tmp_path):
    out = _cli("plan", str(folder), "--budget", "100KiB", "--cache-dir", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("weightlift: error:")]
    assert len(lines) == 1 and "is too small for LlamaForCausalLM: the smallest plan needs" in lines[0]


def test_usage_error_exits_2():
    out = _cli("bench")
    assert out.returncode == 2 and "usage:" in out.stderr


@pytest.fixture(scope="module")
def no_transformers(tmp_path_factory):
    """A folder to put ahead on PYTHONPATH whose `transformers` stops the process: a run that imports it did work
    (loading a model) before its error."""
    path = tmp_path_factory.mktemp("stub")
    (path / "transformers").mkdir()
    (path / "transformers" / "__init__.py").write_text("raise SystemExit('test stub: transformers was imported')\n")
    return path


def _damaged(folder: Path, tmp: Path, how: str) -> Path:
    copy = tmp / how
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    if how == "corrupt":
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 8)  # a header length of 2**64 - 1: safetensors says "header too large"
    else:
        os.truncate(weights, weights.stat().st_size // 2)
    return copy


CASES = {  # name: (arguments after the model folder, what the one line must say)
    "corrupt model.safetensors": (["inspect"], [], r"`[^`]*corrupt/model\.safetensors` has a corrupt header.*damaged"),
    "truncated model.safetensors": (["generate"], ["--prompt", "x"],
                                    r"`[^`]*truncated/model\.safetensors` is truncated.*damaged"),
    "--tokens 0": (["generate"], ["--prompt", "x", "--tokens", "0"], r"`--tokens` must be >= 1, got 0"),
    "--temperature -1": (["generate"], ["--prompt", "x", "--temperature", "-1"], r"`--temperature` must be >= 0"),
    "--top-p without --temperature": (["generate"], ["--prompt", "x", "--top-p", "0.9"],
                                      r"`--top-p` applies only when sampling: add `--temperature"),
    "--plan with --budget": (["generate"], ["--prompt", "x", "--plan", "p.json", "--budget", "1MiB"],
                             r"`--plan` and `--budget` both decide.*drop `--budget`.*drop `--plan`"),
    "--out into a missing folder": (["plan"], ["--budget", "1MiB", "--out", "{tmp}/missing/p.json"],
                                    r"`--out`='[^']*missing/p\.json': the folder `[^`]*missing` does not exist"),
    "--plot into a missing folder": (["bench"], ["--plot", "{tmp}/missing/t.png"],
                                     r"`--plot`='[^']*missing/t\.png': the folder `[^`]*missing` does not exist"),
    "--trace into a missing folder": (["bench"], ["--trace", "{tmp}/missing/t.json"],
                                      r"`--trace`='[^']*missing/t\.json': the folder `[^`]*missing` does not exist"),
    "--budget with a bench knob": (["bench"], ["--budget", "1MiB", "--prefetch-step", "1"],
                                   r"`--prefetch-step` is not used by `weightlift bench --budget`"),
}  # fmt: skip


def _refusal_argv(case: str, folder: Path, tmp_path: Path) -> tuple[list[str], str]:
    (command, rest, message) = CASES[case]
    model = _damaged(folder, tmp_path, case.split()[0]) if "safetensors" in case else folder
    rest = [a.replace("{tmp}", str(tmp_path)) for a in rest]
    cache = ["--cache-dir", str(tmp_path / "cache")] if command != ["inspect"] else []
    return [*command, str(model), *rest, *cache], message


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_any_work(case, folder, tmp_path, in_process, monkeypatch, capsys):
    """Each mistake is one line naming the flag (or the damaged file), exit 2, before any model is loaded
    (the loaders are patched to fail) or measured, and nothing is written. In this process: two of them
    run as processes below, where transformers itself is never imported."""
    argv, message = _refusal_argv(case, folder, tmp_path)
    _not_loaded(monkeypatch)
    assert re.search(message, _one_line_in_process(in_process, argv, capsys))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("case", ["corrupt model.safetensors", "--tokens 0"])
def test_refused_from_the_console_before_transformers_is_imported(case, folder, tmp_path, no_transformers):
    """``python -m weightlift`` with a `transformers` that stops the process when imported: the refusal
    comes first, so no model was loaded or measured."""
    argv, message = _refusal_argv(case, folder, tmp_path)
    out = _cli(*argv, path_first=no_transformers)
    assert re.search(message, _one_error_line(out)), out.stderr
    assert not (tmp_path / "cache").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_generating(tmp_path):
    import transformers as tf

    model = tmp_path / "model"
    config = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(model)
    _save_tokenizer(model, 64)
    out = _cli("generate", str(model), "--prompt", "w40 w3", "--budget", "1MiB", "--cache-dir", str(tmp_path / "c"))
    line = _one_error_line(out)
    assert "tokenizer has 64 tokens and gives id 40, but the model's vocabulary has 32" in line
    assert not (tmp_path / "c").exists()  # refused before planning


def test_bench_plot_gets_prefill_and_decode_of_both_runs_and_the_forward_starts(folder, tmp_path, monkeypatch):
    import logging

    import weightlift.report
    from weightlift.cli import main

    got = {}
    real = weightlift.report.plot_timeline
    monkeypatch.setattr(weightlift.report, "plot_timeline", lambda *a, **kw: got.update(args=a, kw=kw))
    level = logging.getLogger("weightlift").level
    try:
        assert main(["bench", str(folder), "--tokens", "3", "--source", "host", "--plot", str(tmp_path / "x.png")]) == 0
    finally:
        logging.getLogger("weightlift").setLevel(level)
    events, runs, _ = got["args"]
    assert set(runs) == {"resident", "offloaded"}
    assert all(set(r) == {"prefill", "decode"} and min(r.values()) > 0 for r in runs.values())
    starts = got["kw"]["forwards"]
    assert [kind for kind, _ in starts] == ["prefill", "decode", "decode"]
    times = [t for _, t in starts]
    assert times == sorted(times) and min(e[2] for e in events) <= times[1] <= max(e[3] for e in events)
    real(events, runs, tmp_path / "t.png", forwards=starts)
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dtype_reaches_the_loader_and_the_default_is_the_checkpoints(folder, capsys):
    from weightlift.cli import main

    for extra, dtype in (((), "float32"), (("--dtype", "bfloat16"), "bfloat16")):
        assert main(["inspect", str(folder), "--json", *extra]) == 0
        layers = json.loads(capsys.readouterr().out)["layers"]
        assert all(layer["formats"] == [dtype] for layer in layers)


def test_library_errors_are_put_in_flag_words():
    from weightlift.cli_checks import cli_words

    assert cli_words("`disk_path` is given but `source`='host': pass source='disk' to stream from disk") == (
        "`--cache-dir` is given but `--source`='host': pass `--source disk` to stream from disk"
    )
    assert cli_words("make a new plan with weightlift.plan(model, ...)").endswith(
        "`weightlift plan MODEL --budget SIZE --out FILE`"
    )
    assert cli_words("`layers` and `/tmp/budget` stay") == "`layers` and `/tmp/budget` stay"


# --------------------------------------------------------------------------------- the README's claims, in process


@pytest.fixture
def in_process():
    """`weightlift.cli.main` run in this process; the `weightlift` log level it sets (``-v``) put back after."""
    import logging

    from weightlift.cli import main

    level = logging.getLogger("weightlift").level
    yield main
    logging.getLogger("weightlift").setLevel(level)


@pytest.fixture(scope="module")
def templated(folder, tmp_path_factory):
    """``folder``'s model with a tokenizer whose chat template wraps the user turn in w9 ... w10 and, for the
    assistant's turn, adds w11 (the tokenizer's 'wN' has id N)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(folder, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{% for m in messages %}w9 {{ m['content'] }} w10{% endfor %}"
                               "{% if add_generation_prompt %} w11{% endif %}")  # fmt: skip
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("tokenizer,expected", [("templated", [9, 5, 6, 7, 10, 11]), ("plain", [5, 6, 7])])
def test_generate_chat_formats_the_prompt_with_the_template_or_passes_it_plain(
    tokenizer, expected, folder, templated, in_process, capsys
):
    """The ids the model's embedding receives first (the prompt's prefill): the user turn inside the template's
    words, or, for a tokenizer without a template, the prompt's own words."""
    import torch
    from torch import nn

    seen = []

    def first_lookup(module, args):
        if isinstance(module, nn.Embedding) and not seen:
            seen.append(args[0].tolist())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(first_lookup)
    try:
        model = templated if tokenizer == "templated" else folder
        assert in_process(["generate", str(model), "--prompt", "w5 w6 w7", "--tokens", "1", "--device", "cpu",
                           "--json"]) == 0  # fmt: skip
    finally:
        hook.remove()
    assert seen == [[expected]]
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 1


def _weights_bytes_by_hand(offloaded: list[int] = (), streamed: bool = False) -> int:
    """The bytes of ``folder``'s model (parameters and buffers, as a freshly built one holds them) outside the
    layers ``offloaded``; ``streamed`` from its checkpoint on a CPU, less its untied input embedding (it stays
    in its file, `hf.embedding_in_file`)."""
    model = tiny("llama", layers=6)
    assert not model.config.tie_word_embeddings
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    table = model.get_input_embeddings().weight
    total -= table.numel() * table.element_size() if streamed else 0
    return total - sum(t.numel() * t.element_size() for i in offloaded for t in model.model.layers[i].parameters())


@pytest.mark.parametrize("budget", [None, "600KiB"])
def test_generate_summary_line_states_the_memory_held_by_weights(budget, folder, tmp_path, in_process, capsys):
    """The stderr summary's `weights in RAM: SIZE` is the model's bytes counted by hand: everything, resident;
    with a budget, what the plan keeps resident (the layers it does not offload, less the input embedding,
    which stays in its file) plus its pool of slots."""
    from weightlift.config import format_size, parse_size

    extra = ["--budget", budget, "--cache-dir", str(tmp_path)] if budget else []
    assert in_process(["generate", str(folder), "--prompt", "w5 w6 w7", "--tokens", "2", "--device", "cpu",
                       *extra]) == 0  # fmt: skip
    [line] = [line for line in capsys.readouterr().err.splitlines() if "tokens/s" in line]
    predicted = r" \(the plan predicted \d+\.\d\d\)" if budget else ""
    found = re.fullmatch(r"\[2 tokens, first token after \d+\.\d\d s, \d+\.\d\d tokens/s after it" + predicted
                         + r", \d+\.\d tokens/s in all, weights in RAM: ([\d.]+ (?:B|KiB|MiB|GiB)), (\d+) layers "
                         r"offloaded\]", line)  # fmt: skip
    assert found, line
    if budget is None:
        expected, offloaded = _weights_bytes_by_hand(), 0
    else:
        [saved] = (tmp_path / "plans").glob("*.json")  # the plan this run measured
        plan = json.loads(saved.read_text())
        assert plan["offloaded"] and plan["pool_bytes"] > 0
        held = _weights_bytes_by_hand(plan["offloaded"], streamed=True)
        expected, offloaded = held + plan["pool_bytes"], len(plan["offloaded"])
        assert expected <= parse_size(budget)
    assert found.groups() == (format_size(expected), str(offloaded))


def test_bench_prints_slowdown_and_overlap_efficiency_consistent_with_its_other_figures(folder, in_process, capsys):
    """`bench` without a budget: the slowdown is the resident decode rate over the offloaded one, and the overlap
    efficiency lies between the resident step over the offloaded step (no copying counted) and the same with
    all the copy time the report prints spread over the forwards; each within the rounding of the printed
    figures. The report follows."""
    tokens = 3
    assert in_process(["bench", str(folder), "--tokens", str(tokens), "--source", "host", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rates = dict(re.findall(r"^(resident|offloaded) +\d+\.\d{3} +(\d+\.\d)$", out, re.M))
    assert set(rates) == {"resident", "offloaded"}, out
    [(slowdown, efficiency)] = re.findall(r"^slowdown (\d+\.\d\d)x, overlap efficiency (\d+\.\d\d) \(", out, re.M)
    [copying] = re.findall(r"^ *time in offloaded layers +compute [\d.]+ s, .*copying (\d+\.\d{3}) s$", out, re.M)
    assert re.search(r"^ *layer stack +model\.layers \(6 of 6 layers offloaded\)$", out, re.M), out  # the report
    assert "identical tokens: yes" in out

    def span(printed: str, decimals: int) -> tuple[float, float]:  # the values that print as ``printed``
        half = 0.5 * 10**-decimals
        return max(float(printed) - half, 1e-12), float(printed) + half

    (res_lo, res_hi), (off_lo, off_hi) = span(rates["resident"], 1), span(rates["offloaded"], 1)
    s_lo, s_hi = span(slowdown, 2)
    assert res_lo / off_hi <= s_hi and res_hi / off_lo >= s_lo  # slowdown = offloaded step / resident step
    e_lo, e_hi = span(efficiency, 2)
    copy_hi = span(copying, 3)[1] / tokens  # copy seconds per forward, at most (the report's total counts priming)
    assert off_lo / res_hi <= e_hi  # at least the resident step over the offloaded step
    assert e_lo <= max(1 / res_lo, copy_hi) * off_hi  # at most with every copied second counted


def test_verbose_logs_one_line_per_phase_with_its_seconds(folder, tmp_path, in_process, caplog, capsys):
    """``-v``: each phase of a run is one log line `PHASE: S.SS s` (the conversion's own line gives its seconds):
    converting (a folder streamed in another dtype; a GGUF file goes through the same conversion step),
    planning (a budget), loading (a saved plan, or the whole model), writing a layer cache (a disk source)
    and generating."""
    cache = tmp_path / "cache"
    model = str(folder)
    phases = {
        "converting": rf"weightlift: converted {re.escape(folder.name)} to bfloat16 in \d+\.\d s: [\d.]+ [KM]iB "
                      r"written to .*",
        "planning": rf"planning for --budget 300KiB \(measuring this machine and model, streamed\); the offloaded "
                    rf"layers stream from {re.escape(str(cache))}/converted/\S+: \d+\.\d\d s",
        "loading": rf"loading; the offloaded layers stream from {re.escape(str(cache))}/converted/\S+: \d+\.\d\d s",
        "loading the whole model": rf"loading {re.escape(model)}: \d+\.\d\d s",
        "writing a cache": r"setting up the offload \(writing the layer cache on the first run\): \d+\.\d\d s",
        "generating": r"generating up to 2 tokens: \d+\.\d\d s",
    }  # fmt: skip
    budget = ["generate", model, "--prompt", "w5 w6", "--tokens", "2", "--budget", "300KiB", "--dtype", "bfloat16",
              "--device", "cpu", "--cache-dir", str(cache)]  # fmt: skip
    runs = [  # each run, and the phases it goes through
        (budget, ["converting", "planning", "generating"]),
        (budget, ["loading", "generating"]),  # converted and measured already: the plan saved by the first
        (["bench", model, "--tokens", "2", "--source", "disk", "--device", "cpu", "--cache-dir",
          str(tmp_path / "disk")], ["loading the whole model", "writing a cache"]),
    ]  # fmt: skip
    for i, (args, expected) in enumerate(runs):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="weightlift"):
            assert in_process(["-v", *args]) == 0
        messages = caplog.messages
        for phase in phases:
            lines = [m for m in messages if re.fullmatch(phases[phase], m)]
            assert len(lines) == (phase in expected), (i, phase, messages)  # once if it is a phase of this run
        if "writing a cache" in expected:  # and it did write one, in that phase
            assert any(m.startswith("weightlift: wrote the layer cache of LlamaForCausalLM") for m in messages)
        capsys.readouterr()


@pytest.mark.parametrize("budget", [None, "1MiB"])
def test_a_prompt_beyond_the_vocabulary_is_refused_before_the_model_is_loaded(
    budget, tmp_path, in_process, monkeypatch, capsys
):
    """Every way the CLI builds the model (`from_pretrained` for the whole model, `from_config` for the empty
    skeleton that streams) stops the test: the refusal comes first, resident or under a budget."""
    import transformers as tf

    model = tmp_path / "model"
    config = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(model)
    _save_tokenizer(model, 64)
    capsys.readouterr()  # save_pretrained's bar

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for build in ("from_pretrained", "from_config"):
        monkeypatch.setattr(tf.AutoModelForCausalLM, build, loaded)
    extra = ["--budget", budget, "--cache-dir", str(tmp_path / "c")] if budget else []
    assert in_process(["generate", str(model), "--prompt", "w40 w3", "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightlift: error: ") and err.count("\n") == 1
    assert "tokenizer has 64 tokens and gives id 40, but the model's vocabulary has 32" in err
    with pytest.raises(AssertionError, match="the model was loaded"):  # the guard: a prompt within it is loaded
        in_process(["generate", str(model), "--prompt", "w30 w3", "--device", "cpu", *extra])


@pytest.mark.parametrize("broken", [False, True], ids=["same answers", "offloaded answer differs"])
def test_demo_exits_non_zero_when_the_answers_differ(broken, folder, tmp_path, in_process, monkeypatch, capsys):
    """`demo` on ``folder``'s small model (with a tokenizer for its whole vocabulary, so that different tokens
    read differently) in place of SmolLM2: exit 0 with the same answers; when the offloaded run's model is
    broken (the final norm's sign flipped once the layers are offloaded: the streamed answer differs) it says
    so and exits 1."""
    import torch

    import weightlift
    import weightlift.cli_models as models

    model = tmp_path / "model"
    shutil.copytree(folder, model)
    _save_tokenizer(model, 128)
    real_load, real_offload = models.load, weightlift.offload

    def load(args):
        args.model = str(model)
        return real_load(args)

    def offload(model, **kwargs):
        handle = real_offload(model, **kwargs)
        if broken:
            with torch.no_grad():
                model.model.norm.weight.neg_()
        return handle

    monkeypatch.setattr(models, "load", load)
    monkeypatch.setattr(weightlift, "offload", offload)
    status = in_process(["demo", "--tokens", "4", "--prompt", "w5 w6 w7", "--device", "cpu", "--cache-dir",
                         str(tmp_path / "cache")])  # fmt: skip
    out = capsys.readouterr().out
    answers = re.findall(r"^\[(resident|offloaded)\] [\d.]+ tokens/s\n(.*)$", out, re.M)
    assert [key for key, _ in answers] == ["resident", "offloaded"], out
    assert (answers[0][1] != answers[1][1]) == broken
    assert (status, f"identical answers: {'NO' if broken else 'yes'}" in out) == ((1, True) if broken else (0, True))


def _change_mtime(model: Path, args: list, monkeypatch, main) -> list:
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes
    return args


def _change_size(model: Path, args: list, monkeypatch, main) -> list:
    stat = (model / "config.json").stat()
    with open(model / "config.json", "a") as f:
        f.write("\n")  # the same config, one byte longer
    os.utime(model / "config.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: only the size
    return args


def _change_version(model: Path, args: list, monkeypatch, main) -> list:
    import weightlift

    monkeypatch.setattr(weightlift, "__version__", weightlift.__version__ + ".post1")
    return args


def _clear_the_model(model: Path, args: list, monkeypatch, main) -> list:
    cache = args[args.index("--cache-dir") + 1]
    assert main(["cache", "clear", "LlamaForCausalLM", "--cache-dir", cache]) == 0
    assert not list((Path(cache) / "plans").glob("*.json"))
    return args


def _bench_instead(model: Path, args: list, monkeypatch, main) -> list:
    return ["bench", str(model), "--budget", "600KiB", "--device", "cpu", "--cache-dir", args[-1]]


@pytest.mark.parametrize("change", [_change_mtime, _change_size, _change_version, _clear_the_model, _bench_instead],
                         ids=["a file's mtime", "a file's size", "weightlift's version", "cache clear MODEL",
                              "bench --budget"])  # fmt: skip
def test_the_measured_plan_is_measured_again(change, folder, tmp_path, in_process, monkeypatch, capsys):
    """A second `generate --budget` reuses the plan the first measured; after ``change`` the next run measures
    again: a file of the folder with another mtime or size, another weightlift version, the model's entries
    cleared with `weightlift cache clear MODEL`, or `bench --budget`, which always measures afresh."""
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    args = ["generate", str(model), "--prompt", "w5 w6 w7", "--tokens", "2", "--budget", "600KiB", "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert in_process(args) == 0  # measures, saves the plan
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 1

    def measured(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(sys.modules["weightlift.plan"], "plan", measured)  # the module, not weightlift.plan()
    assert in_process(args) == 0  # unchanged: the saved plan, nothing measured
    args = change(model, args, monkeypatch, in_process)
    capsys.readouterr()
    with pytest.raises(AssertionError, match="measured again"):
        in_process(args)


class _Reads:
    """What a run does with some files: ``opens`` through Python's `open`, each a proxy noting the furthest byte
    read (``furthest``, by file) and whether its file descriptor was asked for (``fds``: `mmap.mmap`, `os.read`
    or numpy reading it would); and ``foreign`` opens made any other way (`os.open`, C or Rust code such as
    safetensors' `safe_open`, which maps the file), which the kernel reports (inotify's IN_OPEN) outside the
    Python opens."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, files: list[Path]) -> None:
        import ctypes

        self.files = {str(p.resolve()) for p in files}
        self.opens, self.furthest, self.fds, self.foreign = 0, {}, 0, 0
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(self.IN_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for f in self.files:
            assert libc.inotify_add_watch(self.fd, f.encode(), self.IN_OPEN) >= 0, os.strerror(ctypes.get_errno())

    def drain(self) -> int:
        """IN_OPEN events queued since the last call (successive ones may come merged: at least 1 if any)."""
        import struct

        events = 0
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return events
            at = 0
            while at < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, at)
                events += bool(mask & self.IN_OPEN)
                at += 16 + length

    def proxy(self, f, path: str):
        reads = self

        class Proxy:
            def __getattr__(self, name):
                attr = getattr(f, name)
                if name == "fileno":
                    reads.fds += 1
                if name not in ("read", "read1", "readinto", "readinto1", "readline", "readlines", "peek"):
                    return attr

                def call(*a, **k):
                    out = attr(*a, **k)
                    ahead = len(out) if name == "peek" else 0
                    reads.furthest[path] = max(reads.furthest.get(path, 0), f.tell() + ahead)
                    return out

                return call

            def __iter__(self):
                return iter(self.readline, b"")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Proxy()


@contextlib.contextmanager
def _watching(files: list[Path]):
    """A `_Reads` of ``files`` for the block (`builtins.open` and `io.open` wrapped meanwhile)."""
    import builtins
    import io

    reads, real = _Reads(files), builtins.open

    def watched_open(file, *a, **k):
        path = str(Path(os.fsdecode(file)).resolve()) if isinstance(file, (str, bytes, os.PathLike)) else None
        if path not in reads.files:
            return real(file, *a, **k)
        reads.foreign += reads.drain()  # opened some other way since the last look
        f = real(file, *a, **k)
        assert reads.drain() >= 1  # this open, as the kernel saw it
        reads.opens += 1
        return reads.proxy(f, path)

    try:
        with pytest.MonkeyPatch.context() as patch:
            for module in (builtins, io):
                patch.setattr(module, "open", watched_open)
            yield reads
        reads.foreign += reads.drain()
    finally:
        os.close(reads.fd)


def _header_end(path: Path) -> int:
    """Where a safetensors file's data starts: 8 bytes of header length (little-endian), then the header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_inspect_reads_no_weights(folder, tmp_path, in_process, capsys):
    """`inspect` opens the safetensors files only through Python's `open`, reads nothing past their headers and
    maps nothing (no file descriptor taken); the same watch sees weights read with safetensors (Rust, mapped)
    and past the header with Python, so it would see `inspect` reading them. (A copy of ``folder``: no other
    test's streaming opens these files.)"""
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(folder, tmp_path / "model"))
    weights = sorted(folder.glob("*.safetensors"))
    ends = {str(p.resolve()): _header_end(p) for p in weights}
    assert weights and all(end < p.stat().st_size for end, p in zip(ends.values(), weights))

    with _watching(weights) as reads:
        assert in_process(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] > 0
    assert reads.foreign == 0 and reads.fds == 0
    assert all(reads.furthest.get(path, 0) <= end for path, end in ends.items()), (reads.furthest, ends)

    with _watching(weights) as control:  # the watch sees weights read
        load_file(weights[0])
    assert control.foreign >= 1
    with _watching(weights) as control, open(weights[0], "rb") as f:
        f.read()
    assert control.opens == 1 and control.furthest[str(weights[0].resolve())] == weights[0].stat().st_size


# ------------------------------------------------------------------ more refusals, in process (no subprocess each)


def _one_line_in_process(main, argv: list, capsys) -> str:
    """``main(argv)`` refused as a user error: exit 2, stderr one line `weightlift: error: ...`; that line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("weightlift: error: ") and err.count("\n") == 1, err
    return err


def _deny_writes_under(monkeypatch, root: Path) -> None:
    """`os.access` says no to writing anywhere under ``root`` (the tests run as root, where permissions do not)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and str(Path(path).resolve()).startswith(str(root.resolve())):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def _not_loaded(monkeypatch) -> None:
    import transformers as tf

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for build in ("from_pretrained", "from_config"):
        monkeypatch.setattr(tf.AutoModelForCausalLM, build, loaded)


FLAG_CASES = {  # name: (arguments after the model folder, what the one line must say)
    "--host-budget without --budget": (["generate", "{model}", "--prompt", "x", "--host-budget", "1MiB"],
                                       r"`--host-budget` is used only with `--budget`: add `--budget SIZE` or drop"),
    "--num-in-group above --group-size": (["bench", "{model}", "--group-size", "2", "--num-in-group", "3"],
                                          r"`--num-in-group` must be between 0 and `--group-size` \(2\), got 3"),
    "--num-in-group above the default group": (["bench", "{model}", "--num-in-group", "2"],
                                               r"`--num-in-group` must be between 0 and `--group-size` \(1\), got 2"),
    "--out a folder": (["plan", "{model}", "--budget", "1MiB", "--out", "{tmp}"],
                       r"`--out`='[^']*' is a folder: give a file name"),
    "--cache-dir a file": (["plan", "{model}", "--budget", "1MiB", "--cache-dir", "{tmp}/file"],
                           r"`--cache-dir`='[^']*/file' is a file: give a folder for the layer cache"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_more_flag_mistakes_are_one_line_before_the_model_is_loaded(case, folder, tmp_path, in_process, monkeypatch,
                                                                    capsys):  # fmt: skip
    argv, message = FLAG_CASES[case]
    (tmp_path / "file").write_text("not a folder")
    _not_loaded(monkeypatch)
    argv = [a.replace("{model}", str(folder)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert re.search(message, _one_line_in_process(in_process, argv, capsys))


@pytest.mark.parametrize("what", ["--out", "--cache-dir"])
def test_an_unwritable_output_file_or_cache_folder_is_one_line_naming_it(what, folder, tmp_path, in_process,
                                                                         monkeypatch, capsys):  # fmt: skip
    _deny_writes_under(monkeypatch, tmp_path)
    _not_loaded(monkeypatch)
    if what == "--out":
        argv = ["plan", str(folder), "--budget", "1MiB", "--out", str(tmp_path / "p.json")]
        message = r"`--out`='[^']*p\.json' is not writable here: write the file elsewhere"
    else:
        argv = ["plan", str(folder), "--budget", "1MiB", "--cache-dir", str(tmp_path / "new" / "cache")]
        message = r"`--cache-dir`='[^']*new/cache' cannot be created \(`[^`]*` is not writable\): give a writable"
    assert re.search(message, _one_line_in_process(in_process, argv, capsys))
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_one_line_naming_the_extra(folder, tmp_path, in_process, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    _not_loaded(monkeypatch)
    line = _one_line_in_process(in_process, ["bench", str(folder), "--plot", str(tmp_path / "t.png")], capsys)
    assert "`--plot` needs matplotlib: `pip install 'weightlift[plot]'`, or drop `--plot`" in line
    assert not (tmp_path / "t.png").exists()


def _small_model(path: Path, **kw) -> Path:
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(path, **kw)
    return path


def test_generate_on_a_model_without_tokenizer_files_is_one_line_before_loading(tmp_path, in_process, monkeypatch,
                                                                                 capsys):  # fmt: skip
    model = _small_model(tmp_path / "model")
    _not_loaded(monkeypatch)
    line = _one_line_in_process(in_process, ["generate", str(model), "--prompt", "hi", "--device", "cpu"], capsys)
    assert f"`MODEL`='{model}' has no tokenizer files: generate needs a tokenizer" in line


@pytest.mark.parametrize("damage", ["config.json", "missing shard"])
def test_a_model_folder_with_a_bad_config_or_a_missing_shard_is_one_line_naming_the_file(
    damage, tmp_path, in_process, capsys
):
    model = _small_model(tmp_path / "model", max_shard_size="10KB")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    if damage == "config.json":
        (model / "config.json").write_text("{ not json")
        message = r"`[^`]*model/config\.json` cannot be read as JSON \(.*\): the model file is damaged: download"
    else:
        (model / shards[-1]).unlink()
        message = (rf"`[^`]*model\.safetensors\.index\.json` names 1 missing file\(s\), e.g. `{re.escape(shards[-1])}`"
                   r": the model file is damaged")  # fmt: skip
    assert re.search(message, _one_line_in_process(in_process, ["inspect", str(model)], capsys))
