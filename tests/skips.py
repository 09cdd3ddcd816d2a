"""`make test` installs every test extra and sets ``WEIGHTLIFT_NO_SKIPS=1``: there a skip is a failure unless
its reason is about the accelerator this machine has or lacks (a missing package would otherwise pass
quietly as a skip). A pytest plugin: conftest imports its hook; ``-p skips`` loads it alone."""

from __future__ import annotations

import os

import pytest

REQUIRE = "WEIGHTLIFT_NO_SKIPS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get(REQUIRE) == "1" and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
        if "accelerator" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped where every test extra is installed ({REQUIRE}=1): {reason}"
