"""The CLI through a subprocess: help, JSON, plots, and user errors as one line with a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import tiny


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightlift", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=cwd)  # fmt: skip


def test_help_lists_commands_and_examples():
    out = _cli("--help")
    assert out.returncode == 0
    assert "examples:" in out.stdout
    for command in ("demo", "bench", "inspect", "plan", "generate"):
        assert command in out.stdout
        sub = _cli(command, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny("llama", layers=6).save_pretrained(path)
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
    text = _cli("plan", str(folder), "--budget", "600KiB", "--cache-dir", str(tmp_path))
    assert text.returncode == 0 and "predicted decode" in text.stdout and "model.layers.5" in text.stdout


def test_bench_with_a_budget_reports_predicted_and_measured(folder, tmp_path):
    out = _cli("bench", str(folder), "--budget", "600KiB", "--cache-dir", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert set(result["forwards"]) == {"prefill", "decode"}
    for row in result["forwards"].values():
        assert row["predicted_s"] > 0 and row["measured_s"] > 0
    assert result["report"]["device_bytes"] <= 600 * 1024


def test_generate_streams_and_summarises(tmp_path):
    out = _cli("generate", "smollm2", "--budget", "300MiB", "--cache-dir", str(tmp_path), "--prompt", "Hi!",
               "--tokens", "4")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()  # the streamed answer
    summary = [line for line in out.stderr.splitlines() if line.startswith("[")]
    assert len(summary) == 1 and "tokens/s" in summary[0] and "layers offloaded" in summary[0]
    assert "it/s" not in out.stderr  # no progress bars when piped
    as_json = _cli("generate", "smollm2", "--prompt", "Hi!", "--tokens", "3", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["new_tokens"] == 3


@pytest.mark.parametrize("source", ["disk", "host", "checkpoint"])
def test_bench_json_and_plot_on_a_model_folder(tmp_path, source):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "model")
    folder = tmp_path / "model" if source == "checkpoint" else tmp_path / "cache"
    out = _cli("bench", str(tmp_path / "model"), "--tokens", "4", "--source", source, "--cache-dir", str(folder),
               "--json", "--plot", str(tmp_path / "t.png"), "--trace", str(tmp_path / "t.json"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
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
        (["bench", "smollm2", "--prefetch-step", "-1"], "`prefetch_step` must be an int >= 0"),
        (["bench", "smollm2", "--device", "gpu9"], "is not a device torch knows"),
        (["plan", "/nonexistent/model", "--budget", "1GiB"], "is neither 'smollm2', a .gguf file"),
        (["inspect", "/nonexistent/model"], "is neither 'smollm2', a .gguf file"),
        (["plan", "smollm2", "--budget", "lots"], "`budget`='lots' is not a size"),
        (["inspect", "smollm2", "--budget", "12 parsecs"], "`budget`='12 parsecs' is not a size"),
        (["generate", "smollm2", "--prompt", "x", "--budget", "1GiB", "--host-budget", "-"], "`host_budget`='-'"),
        (["generate", "smollm2", "--prompt", "x", "--plan", "/nonexistent.json"], "`--plan`='/nonexistent.json'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("weightlift: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in out.stderr


def test_a_budget_below_the_minimum_is_one_line_stating_it(folder, tmp_path):
    out = _cli("plan", str(folder), "--budget", "100KiB", "--cache-dir", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("weightlift: error:")]
    assert len(lines) == 1 and "is too small for LlamaForCausalLM: the smallest plan needs" in lines[0]


def test_usage_error_exits_2():
    out = _cli("bench")
    assert out.returncode == 2 and "usage:" in out.stderr
