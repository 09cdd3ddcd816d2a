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
    assert "demo" in out.stdout and "bench" in out.stdout and "examples:" in out.stdout


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
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    out = _cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.startswith("weightlift: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in out.stderr


def test_usage_error_exits_2():
    out = _cli("bench")
    assert out.returncode == 2 and "usage:" in out.stderr
