"""`make gpu-check`: the gpu-marked tests and a short GPU benchmark in one command, with one summary.

Made to run first time on a GPU machine without network, from the source tree (``PYTHONPATH=src``, no
install), in well under 8 minutes on one GPU:

1. without an accelerator (``torch.accelerator.is_available()`` false) it says so, runs nothing, claims
   nothing and exits 0;
2. pytest: the installed one, else installed offline from the wheel folder ``.gpu-wheels/`` (made by
   ``make gpu-wheels`` where there is network, carried along) into a temporary folder; if neither works it
   says so and skips the tests, and the benchmark still runs;
3. ``pytest -m gpu -q -rfEs tests/`` in a subprocess, stopped after ``--test-timeout`` seconds; each test's
   outcome comes from the small pytest plugin in this file (``-p gpu_check``), so a timeout still tells
   what passed and which test was running. The plugin also fails a single test that runs past
   ``--per-test-timeout`` seconds (SIGALRM, after printing every thread's stack: a deadlock shows where),
   so one hang does not take the rest of the tests with it;
4. ``benchmarks/gpu_bench.py`` in a subprocess: JSON lines in ``benchmarks/results/gpu.jsonl``;
5. the summary, printed and written to ``benchmarks/results/gpu-summary.txt``.

Exit status 1 if a test failed or errored, the tests did not finish, the benchmark failed or did not
finish, or the offloaded tokens differ from the resident ones; 0 otherwise. Skips (a missing package, a
single device) are printed with their reasons and do not fail the check.

This module imports only the standard library at the top: pytest loads it as a plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".gpu-wheels"
RESULTS_ENV = "WEIGHTLIFT_GPU_CHECK_RESULTS"
LIMIT_ENV = "WEIGHTLIFT_GPU_CHECK_TEST_LIMIT"  # seconds one test may take (setup to teardown); 0: no limit
PYTEST_ARGS = ["-m", "gpu", "-q", "-rfEs", "-p", "gpu_check", "tests/"]


# ---- the pytest plugin: one JSON line per test phase, into the file named by $WEIGHTLIFT_GPU_CHECK_RESULTS


def _record(entry: dict) -> None:
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _message(report) -> str:
    lines = [line for line in str(getattr(report, "longreprtext", "") or "").splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors[0] if errors else lines[-1] if lines else "")[:300]


def _expired(signum, frame) -> None:
    faulthandler.dump_traceback(all_threads=True)  # into the test's captured stderr: where each thread hangs
    raise TimeoutError(f"gpu-check: this test ran past {os.environ.get(LIMIT_ENV)} s (every thread's stack above)")


def pytest_runtest_logstart(nodeid, location) -> None:
    _record({"nodeid": nodeid, "when": "start"})
    limit = int(os.environ.get(LIMIT_ENV, "0") or 0)
    if limit and hasattr(signal, "SIGALRM"):  # one hung test fails alone instead of eating the whole run
        signal.signal(signal.SIGALRM, _expired)
        signal.alarm(limit)


def pytest_runtest_logfinish(nodeid, location) -> None:
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)


def pytest_runtest_logreport(report) -> None:
    entry = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome}
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        entry["reason"] = ("xfail: " if hasattr(report, "wasxfail") else "") + reason.removeprefix("Skipped: ")
    elif report.failed:
        entry["message"] = _message(report)
    _record(entry)


def pytest_collectreport(report) -> None:
    if report.failed:
        _record({"nodeid": report.nodeid or "<collection>", "when": "collect", "outcome": "failed",
                 "message": _message(report)})  # fmt: skip


# ---- reading the results


def tally(entries: list[dict]) -> dict:
    """Outcome per test from the plugin's lines: an error in setup, teardown or collection is an error, a
    failed call a failure, a skip (in any phase) a skip; a test that started and has no call result did not
    finish (the run was stopped while it ran)."""
    tests: dict[str, dict] = {}
    for e in entries:
        tests.setdefault(e["nodeid"], {})[e["when"]] = e
    out = {"passed": [], "failed": [], "skipped": [], "errors": [], "unfinished": []}
    for nodeid, phases in tests.items():
        bad = [p for w, p in phases.items() if w in ("setup", "teardown", "collect") and p["outcome"] == "failed"]
        skip = next((p for p in phases.values() if p.get("outcome") == "skipped"), None)
        call = phases.get("call")
        if bad:
            out["errors"].append((nodeid, bad[0].get("message", "")))
        elif call is not None and call["outcome"] == "failed":
            out["failed"].append((nodeid, call.get("message", "")))
        elif skip is not None:
            out["skipped"].append((nodeid, skip.get("reason", "")))
        elif call is not None and call["outcome"] == "passed":
            out["passed"].append((nodeid, ""))
        elif "start" in phases:
            out["unfinished"].append((nodeid, "did not finish"))
    return out


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short when the process was stopped
            out.append(json.loads(line))
    return out


# ---- running things


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    parts = [str(ROOT / "src"), str(ROOT / "benchmarks"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


def run_streamed(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` (in its own process group) with its output shown and kept in ``log``; stop it after
    ``timeout`` seconds. Returns (exit status or None when stopped, seconds)."""
    start = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)  # fmt: skip

        def pump() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                sink.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the process group this call started, nothing else
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
    return rc, time.monotonic() - start


def _imports(python: str, boot: str, env: dict) -> tuple[bool, str]:
    out = subprocess.run([python, "-c", boot + "import pytest; print(pytest.__version__)"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    text = (out.stdout if out.returncode == 0 else out.stderr).strip()
    return out.returncode == 0, text.splitlines()[-1] if text else ""


def find_pytest(python: str, env: dict, wheels: Path = WHEELS) -> tuple[str | None, str]:
    """Python code that makes pytest importable (``""`` when it is installed), or None; and what was done.

    From ``wheels``: ``pip install --no-index --find-links`` into a temporary folder, or, if pip is missing or
    refuses, the wheels unpacked there (pure-python wheels are zip files that work unpacked). The folder is
    appended to ``sys.path``, after site-packages, so the wheels never shadow the system's own packages
    (packaging, typing_extensions); put first only if pytest imports no other way.
    """
    ok, version = _imports(python, "", env)
    if ok:
        return "", f"pytest {version} (installed)"
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return None, (f"pytest does not import and there is no {wheels.name}/ folder of wheels: run `make gpu-wheels` "
                      f"where there is network and carry {wheels.name}/ along")  # fmt: skip
    target = tempfile.mkdtemp(prefix="weightlift-pytest-")
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--target", target]
    pip = subprocess.run([*install, "pytest"], env=env, capture_output=True, text=True, timeout=300)
    how = "pip install --no-index"
    if pip.returncode != 0:
        last = (pip.stderr.strip().splitlines() or ["?"])[-1][:200]
        for wheel in found:
            if wheel.name.endswith("-none-any.whl"):
                with zipfile.ZipFile(wheel) as z:
                    z.extractall(target)
        how = f"wheels unpacked (pip failed: {last})"
    errors = []
    for boot in (f"import sys; sys.path.append({target!r}); ", f"import sys; sys.path.insert(0, {target!r}); "):
        ok, version = _imports(python, boot, env)
        if ok:
            return boot, f"pytest {version} installed offline from {wheels.name}/ into {target} ({how})"
        errors.append(version)
    return None, f"pytest could not be installed from {wheels.name}/ ({how}): {errors[-1]}"


def run_tests(python: str, boot: str, env: dict, timeout: float, per_test: int) -> dict:
    results = RESULTS / "gpu-pytest.jsonl"
    results.unlink(missing_ok=True)
    cmd = [python, "-c", boot + "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))", *PYTEST_ARGS]
    print(f"\n== tests: pytest {' '.join(PYTEST_ARGS)} (stopped after {timeout:.0f} s; one test after {per_test} s)",
          flush=True)  # fmt: skip
    env = {**env, RESULTS_ENV: str(results), LIMIT_ENV: str(per_test)}
    rc, seconds = run_streamed(cmd, env, timeout, RESULTS / "gpu-pytest.log")
    out = tally(read_lines(results))
    out.update(rc=rc, seconds=seconds, timed_out=rc is None)
    return out


def run_bench(python: str, env: dict, run_id: str, timeout: float, extra: list[str]) -> dict:
    out = RESULTS / "gpu.jsonl"
    cmd = [python, str(ROOT / "benchmarks" / "gpu_bench.py"), "--out", str(out), "--run", run_id, *extra]
    print(f"\n== benchmark: {' '.join(cmd[1:])} (stopped after {timeout:.0f} s)", flush=True)
    rc, seconds = run_streamed(cmd, env, timeout, RESULTS / "gpu-bench.log")
    records = [r for r in read_lines(out) if r.get("run") == run_id]
    return {"rc": rc, "seconds": seconds, "timed_out": rc is None, "records": records}


# ---- the summary


def summarise(card: str, torch_version: str, pytest_note: str, tests: dict | None, bench: dict,
              seconds: float) -> tuple[list[str], list[str]]:  # fmt: skip
    """The summary lines and the reasons the check fails (empty: it passes)."""
    from gpu_bench import summary_lines

    lines = [f"weightlift gpu-check: {card}, torch {torch_version}, {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    problems = []
    lines.append(f"pytest: {pytest_note}")
    if tests is None:
        lines.append("tests: NOT RUN (no pytest): nothing is claimed for them")
    else:
        counts = ", ".join(f"{len(tests[k])} {k}" for k in ("passed", "failed", "skipped", "errors"))
        lines.append(f"tests (pytest -m gpu tests/, {tests['seconds']:.0f} s): {counts}")
        for kind in ("failed", "errors"):
            for nodeid, message in tests[kind]:
                lines.append(f"  {kind.upper().rstrip('S')}: {nodeid}: {message}")
        if tests["failed"] or tests["errors"]:
            problems.append(f"{len(tests['failed'])} tests failed, {len(tests['errors'])} errors")
        if tests["timed_out"]:
            running = ", ".join(n for n, _ in tests["unfinished"]) or "none recorded"
            lines.append(f"  STOPPED after {tests['seconds']:.0f} s while running: {running}")
            problems.append("the tests did not finish")
        elif tests["rc"] not in (0, 1) and not tests["failed"] and not tests["errors"]:
            lines.append(f"  pytest exited with status {tests['rc']} (see benchmarks/results/gpu-pytest.log)")
            problems.append(f"pytest exited with status {tests['rc']}")
        for reason, n in Counter(reason for _, reason in tests["skipped"]).most_common():
            lines.append(f"  skipped {n}: {reason}")
    lines.append("benchmark: every layer offloaded from host RAM, prefetch_step=2, bf16, greedy generate with KV "
                 "cache; each offloaded figure against the resident run of the same model in the same run")  # fmt: skip
    for record in bench["records"]:
        lines += [f"  {line}" for line in summary_lines(record)]
        if "error" in record:
            problems.append(f"benchmark error on {record['model']}")
        elif "tokens_equal" in record and not record["tokens_equal"]:
            problems.append(f"offloaded tokens differ from resident on {record['model']}")
    if bench["timed_out"]:
        lines.append(f"  STOPPED after {bench['seconds']:.0f} s (see benchmarks/results/gpu-bench.log)")
        problems.append("the benchmark did not finish")
    elif bench["rc"] != 0:
        lines.append(f"  gpu_bench.py exited with status {bench['rc']} (see benchmarks/results/gpu-bench.log)")
        problems.append("the benchmark failed")
    elif not bench["records"]:
        problems.append("the benchmark wrote no results")
    lines.append(f"results: benchmarks/results/gpu.jsonl (run {bench.get('run', '?')}); total {seconds:.0f} s")
    verdict = "FAIL: " + "; ".join(problems) if problems else "PASS"
    if tests is None:
        verdict += " (benchmark only: the tests were not run)"
    lines.append(f"RESULT: {verdict}")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-timeout", type=float, default=300.0, help="seconds for the whole pytest run")
    parser.add_argument("--per-test-timeout", type=int, default=120, help="seconds one test may take; 0: no limit")
    parser.add_argument("--bench-timeout", type=float, default=180.0)
    parser.add_argument(
        "--budget",
        type=float,
        default=450.0,
        help="seconds for everything: the benchmark gets what the tests left (at least 90 s)",
    )
    parser.add_argument("--skip-tests", action="store_true", help="only the benchmark")
    args, bench_args = parser.parse_known_args(argv)
    start = time.monotonic()
    try:
        import torch
    except ImportError as err:
        print(f"gpu-check: torch does not import with {sys.executable} ({err}): nothing was run and nothing is "
              "claimed. Use a Python that has torch (make gpu-check PYTHON=/path/to/python).")  # fmt: skip
        return 0
    if not torch.accelerator.is_available():
        print(f"gpu-check: no accelerator: torch {torch.__version__} ({sys.executable}) reports "
              "torch.accelerator.is_available() == False.\nNothing was run and nothing is claimed: no tests, no "
              "benchmark, no results written.")  # fmt: skip
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = _env()
    python = sys.executable
    tests = None
    if args.skip_tests:
        pytest_note = "tests skipped (--skip-tests)"
    else:
        boot, pytest_note = find_pytest(python, env)
        print(f"gpu-check: {pytest_note}", flush=True)
        if boot is not None:
            tests = run_tests(python, boot, env, args.test_timeout, args.per_test_timeout)
    run_id = time.strftime("%Y%m%dT%H%M%S")
    left = max(90.0, args.budget - (time.monotonic() - start))
    bench = run_bench(python, env, run_id, min(args.bench_timeout, left), bench_args)
    bench["run"] = run_id
    device = torch.accelerator.current_accelerator()
    card = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
    lines, problems = summarise(card, torch.__version__, pytest_note, tests, bench, time.monotonic() - start)
    text = "\n".join(lines) + "\n"
    (RESULTS / "gpu-summary.txt").write_text(text)
    print("\n== summary (also in benchmarks/results/gpu-summary.txt)\n" + text, end="", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
