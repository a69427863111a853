"""firmware/util.py: the one helper per concern (ticks, dates, config merging), on
CPython and on the micropython binary, checked against CPython's own calendar."""
import datetime
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "firmware"))

SCRIPT = r"""
import json
import util
days = [-719468, -1, 0, 59, 60, 365, 11016, 20454, 20516, 24837, 2932896]
out = {"civil": [list(util.civil_from_days(d)) for d in days],
       "back": [util.days_from_civil(*util.civil_from_days(d)) for d in days],
       "wd": [util.weekday(d) for d in days],
       "epoch": util.epoch_s(2026, 11, 26, 6, 50, 1),
       "diff": [util.ticks_diff(util.ticks_add(0x3FFFFFFB, 10), 0x3FFFFFFB),
                util.ticks_diff(0x3FFFFFFB, util.ticks_add(0x3FFFFFFB, 10))],
       "merge": util.merge("config", {"a": 1, "b": 2}, None, {"b": 3}, {}),
       "pick": util.pick({"a": 1, "fs": "/"}, ("a", "b"))}
try:
    util.merge("x config", {"a": 1}, {"c": 2})
    out["err"] = None
except ValueError as e:
    out["err"] = str(e)
print(json.dumps(out))
"""


def _cpython():
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(SCRIPT, {})
    return json.loads(buf.getvalue())


def _micropython():
    env = dict(os.environ, MICROPYPATH=":".join([".frozen", os.path.join(ROOT, "firmware")]))
    r = subprocess.run([os.path.join(ROOT, ".venv", "bin", "micropython"), "-c", SCRIPT],
                       capture_output=True, text=True, env=env, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("run", [_cpython, _micropython])
def test_util_against_the_calendar(run):
    out = run()
    days = [-719468, -1, 0, 59, 60, 365, 11016, 20454, 20516, 24837, 2932896]
    ep = datetime.date(1970, 1, 1)
    for d, ymd, w in zip(days, out["civil"], out["wd"]):
        if d >= -719162:                       # datetime starts at year 1
            ref = ep + datetime.timedelta(days=d)
            assert ymd == [ref.year, ref.month, ref.day], d
            assert w == ref.weekday(), d
    assert out["back"] == days
    assert out["epoch"] == int(datetime.datetime(2026, 11, 26, 6, 50, 1,
                                                 tzinfo=datetime.timezone.utc).timestamp())
    assert out["diff"] == [10, -10]                  # across the wrap (30-bit on CPython)
    assert out["merge"] == {"a": 1, "b": 3}
    assert out["pick"] == {"a": 1}
    assert out["err"] == "x config: unknown key 'c' (known: a)"
