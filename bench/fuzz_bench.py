"""Issue 10 figure: the fuzz suite's case count (tests/fuzz_harness.py), for bench/run.py.

    fuzz_cases()     runs every target with a fresh random seed and returns
                     fuzz_cases (cases run, all targets; goal >= 100 000),
                     fuzz_failures (failing properties; goal 0),
                     fuzz_by_target {target: cases}, fuzz_seed (to replay a run),
                     fuzz_driver_crc_blind (driver cases whose mutated STPM3x replies
                     still carry a valid CRC-8, e.g. an all-zero frame: the CRC cannot
                     see them), fuzz_driver_undetectable (of those, the cases where a
                     wrong value still got through the driver's own checks; goal 0)

Targets and their share: decoder (head-end decoder + ingest into SQLite) 30 000,
commands (firmware command parser on micropython) 30 000, mqtt (firmware MQTT packet
parser on micropython) 20 000, driver (STPM3x frames with corrupted replies, SPI and
UART, on micropython) 20 000, api (the REST API over HTTP) 12 000. The tests
(tests/test_fuzz.py) run the same properties with a few thousand cases.

Run alone: python bench/fuzz_bench.py [--seed N]
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

SHARES = (("decoder", 30000), ("commands", 30000), ("mqtt", 20000), ("driver", 20000),
          ("api", 12000))


def fuzz_cases(seed=None):
    import logging
    import fuzz_harness
    logging.disable(logging.WARNING)          # ingest logs every quarantined payload
    seed = random.randrange(1 << 31) if seed is None else seed
    total, failures, by, undetected, blind, detail = 0, [], {}, 0, 0, {}
    for target, n in SHARES:
        r = fuzz_harness.run(target, n, seed)
        by[target] = r["cases"]
        total += r["cases"]
        failures += ["%s: %s" % (target, f) for f in r["failures"]]
        undetected += r.get("undetected", 0)
        blind += r.get("crc_blind", 0)
        detail[target] = {k: v for k, v in r.items() if k not in ("failures",)}
    logging.disable(logging.NOTSET)
    print(json.dumps({"fuzz_detail": detail, "failures": failures})[:5000], file=sys.stderr)
    return {"fuzz_cases": total, "fuzz_failures": len(failures), "fuzz_by_target": by,
            "fuzz_seed": seed, "fuzz_driver_crc_blind": blind,
            "fuzz_driver_undetectable": undetected}


MEASUREMENTS = [
    ("fuzz_cases", fuzz_cases, ["fuzz_cases", "fuzz_failures", "fuzz_by_target", "fuzz_seed",
                                "fuzz_driver_crc_blind", "fuzz_driver_undetectable"]),
]

if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(fuzz_cases(int(a[1]) if a[:1] == ["--seed"] else None)))
