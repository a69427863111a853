"""firmware/main.py as an installer meets it on the console: bad options and a board that
fails at start give one clear error line and a non-zero exit, never a traceback."""
import json
import os
import subprocess

from headend import ROOT
from headend.meter import firmware_env, micropython_path


def run(args, extra_path=None):
    env = firmware_env()
    if extra_path:
        env["MICROPYPATH"] = extra_path + ":" + env["MICROPYPATH"]
    r = subprocess.run([micropython_path(), "-X", "heapsize=1m",
                        os.path.join(ROOT, "firmware", "main.py")] + args,
                       capture_output=True, text=True, timeout=60, env=env)
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    return r, lines


def test_bad_options_are_named():
    for args, words in ((["--days", "x"], "--days"), (["--bogus", "1"], "unknown option --bogus"),
                        (["--board"], "needs a value"), (["--board", "nope"], "board 'nope' not found"),
                        (["--print", "loud"], "--print must be")):
        r, lines = run(args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert lines and lines[-1]["type"] == "error" and words in lines[-1]["msg"], (args, lines)
        assert "Traceback" not in r.stderr


def test_a_board_that_fails_at_start_reports_it(tmp_path):
    (tmp_path / "broken_board.py").write_text(
        "def build(opts=None):\n"
        "    raise OSError('STPM3x chip 0 does not answer: check wiring')\n")
    r, lines = run(["--board", "broken_board"], str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    assert lines[-1]["type"] == "error" and "check wiring" in lines[-1]["msg"]
    assert "Traceback" not in r.stderr


def test_options_convert_to_their_types_and_unknown_lists_them_all():
    # each option converts to its own type; the unknown-option error names every option
    code = ("import main\n"
            "o = main.parse_args(['--speed', '2.5', '--seed', '7', '--board', 'b', '--step',"
            " '--read-ms', '40'])\n"
            "print(repr(sorted(o.items())))\n"
            "try:\n"
            "    main.parse_args(['--nope', '1'])\n"
            "except main.ConfigError as e:\n"
            "    print(e)\n")
    r = subprocess.run([micropython_path(), "-c", code], capture_output=True, text=True,
                       timeout=60, env=firmware_env())
    out = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert out[0] == repr([("board", "b"), ("read_ms", 40), ("seed", 7), ("speed", 2.5),
                           ("step", True)])
    names = ("board bridge broker creds days id interval modem no_comm payload plc print profile "
             "read_ms rt seed sensor_errors speed start state step transport").split()
    assert out[1] == "unknown option --nope; known: " + ", ".join(names)
