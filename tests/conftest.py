"""Suite-wide rules.

Under CI (`CI` set to anything but "" / "0" / "false"), a skipped test is a failure: a
missing tool is a setup bug that `make test` must fix, never a reason to pass quietly.
A developer without, say, Chromium still sees the skip and its reason locally.
"""
import os

import pytest


def _ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_skip(report):
    if _ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = "skipped under CI (a skip is a failure here): %s" % reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip(outcome.get_result())
