"""What the bench modules share: paths, running a script on micropython, the compiled tree."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, os.path.join(ROOT, "tests"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from headend.meter import firmware_env, micropython_path  # noqa: E402

MP_SCRIPTS = os.path.join(HERE, "mp")


def run_mp(script, *args, heap="1m", timeout=900, env=None, binary=None):
    """Run a bench script on the micropython binary; it prints one JSON object last."""
    argv = [binary or micropython_path(), "-X", "heapsize=%s" % heap,
            os.path.join(MP_SCRIPTS, script)]
    argv += [str(a) for a in args]
    if env is None:
        env = firmware_env()
        env["MICROPYPATH"] += ":" + os.path.join(ROOT, "tests")
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        raise RuntimeError("%s failed (exit %d): %s" % (script, r.returncode, (r.stderr or r.stdout)[-800:]))
    return json.loads(lines[-1])


def fw32_binary():
    """The 32-bit unix MicroPython with the firmware (and the unix_sim_3ph board, the
    simulator, the heap probe) frozen in, as a board's image holds it: built by make setup,
    rebuilt here when an input changed (tools/mpbuild.py)."""
    from fw32_harness import fw32_binary as b
    return b()


def run_fw32(code, heap_kib=100, args=(), timeout=300):
    """Run a script's text on the 32-bit frozen build with only frozen modules importable
    (as on a board) and a heap of heap_kib (100: the STM32F405's). Returns stdout; raises
    AssertionError with the output when the script fails."""
    from fw32_harness import run_fw32 as r
    return r(code, heap_kib=heap_kib, args=args, timeout=timeout)


def compiled_tree():
    from headend.meter import compiled_tree as tree
    # a lane of `run.py --jobs 2` compiles into its own directory (BENCH_OUT)
    return tree(os.environ.get("BENCH_OUT") or os.path.join(HERE, "out"))


def smallest_passing(runs, guess, step, cap, floor=0):
    """Smallest size (a multiple of step) for which runs(size) is true, found around a
    first guess: the steps from the guess double until one run fails below a passing size
    (or passes above a failing one), then the bracket is bisected down to one step. The
    answer is always a size that ran with the size one step below it failing (or the
    floor), whatever the guess: the guess only decides how many tries it takes (two when
    it is right, against seven or eight for halving down from a large heap; each try of
    min_heap_kib is a simulated day). Raises when cap itself does not run."""
    guess = max(floor + step, min(cap, guess // step * step))
    if runs(guess):
        hi, d = guess, step
        while hi - d > floor and runs(hi - d):
            hi -= d
            d *= 2
        lo = max(floor, hi - d)
    else:
        lo, d = guess, step
        while True:
            hi = min(cap, lo + d)
            if runs(hi):
                break
            if hi >= cap:
                raise RuntimeError("does not run even at %d" % cap)
            lo, d = hi, d * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if runs(mid):
            hi = mid
        else:
            lo = mid
    return hi


def previous_result(key, default):
    """A figure of the last full run (bench/results.json), e.g. as a search's first guess;
    default when there is none."""
    try:
        with open(os.path.join(HERE, "results.json")) as f:
            v = json.load(f).get(key)
    except (OSError, ValueError):
        return default
    return v if isinstance(v, (int, float)) else default
