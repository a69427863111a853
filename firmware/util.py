# Small helpers every firmware layer needs, written once (one helper per concern):
#   ticks      ticks_ms / ticks_us / ticks_diff / ticks_add: the port's wrapping ticks, or
#              the same 30-bit arithmetic on CPython for the host tests
#   sleeping   sleep_ms (asyncio), sleep_us (blocking, bus timing), wait_ms (await with a
#              deadline), wait_event (an Event or a timeout, then cleared)
#   deadlines  deadline_ms(ms) -> tick; remaining_ms(deadline) (negative once passed)
#   dates      days_from_civil, civil_from_days, weekday, epoch_s: proleptic Gregorian,
#              epoch 1970 on every port (MCU ports count from 2000, unix from 1970)
#   config     merge(what, defaults, *layers): defaults overridden layer by layer,
#              an unknown key refused with a ValueError that lists the known ones
#   modules    unload(name): drop a module loaded on use (decision 0020)
# Real time only: the meter's own timeline (virtual on the unix boards) is hw.clock.
import time

try:
    import asyncio
except ImportError:  # pragma: no cover - very old ports
    import uasyncio as asyncio

# ---- ticks ----
if hasattr(time, "ticks_ms"):
    ticks_ms = time.ticks_ms
    ticks_us = time.ticks_us
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
else:  # CPython, host-side tests only: the same wrap as a 30-bit port
    _t0 = time.monotonic()

    def ticks_ms():
        return int((time.monotonic() - _t0) * 1000) & 0x3FFFFFFF

    def ticks_us():
        return int((time.monotonic() - _t0) * 1000000) & 0x3FFFFFFF

    def ticks_diff(a, b):
        d = (a - b) & 0x3FFFFFFF
        return d - 0x40000000 if d & 0x20000000 else d

    def ticks_add(a, b):
        return (a + b) & 0x3FFFFFFF


# ---- sleeping and deadlines ----
if hasattr(time, "sleep_us"):
    sleep_us = time.sleep_us            # short, blocking waits (bus timing, pulses)
else:  # CPython
    def sleep_us(us):
        time.sleep(us / 1000000)


# sleep_ms(ms) and wait_ms(aw, ms) return asyncio's own awaitable (await it at once, as
# every caller does: MicroPython's sleep_ms object is shared), not a coroutine of ours
# wrapping it: a wrapper is one more generator frame on the heap for every task parked
# in a sleep or a wait, for as long as it waits (docs/ram.md).
if hasattr(asyncio, "sleep_ms"):
    sleep_ms = asyncio.sleep_ms
else:  # CPython
    def sleep_ms(ms):
        return asyncio.sleep(ms / 1000)

if hasattr(asyncio, "wait_for_ms"):
    def wait_ms(aw, ms):
        """await `aw` for at most ms milliseconds (asyncio.TimeoutError after)."""
        return asyncio.wait_for_ms(aw, ms)
else:  # CPython
    def wait_ms(aw, ms):
        """await `aw` for at most ms milliseconds (asyncio.TimeoutError after)."""
        return asyncio.wait_for(aw, ms / 1000)


async def wait_event(ev, ms):
    """Wait for asyncio.Event `ev` at most ms milliseconds, then clear it (a task's
    "wake me on this, or every ms")."""
    try:
        await wait_ms(ev.wait(), ms)
    except asyncio.TimeoutError:
        pass
    ev.clear()


def deadline_ms(ms):
    """The tick ms milliseconds from now (compare with remaining_ms)."""
    return ticks_add(ticks_ms(), ms)


def remaining_ms(deadline):
    """Milliseconds left until the tick `deadline` (negative once it has passed)."""
    return ticks_diff(deadline, ticks_ms())


# ---- civil dates (H. Hinnant's algorithms) ----
def days_from_civil(y, m, d):
    """Days since 1970-01-01 of a proleptic Gregorian date."""
    y -= m <= 2
    era = y // 400                      # floor division: right for negative years too
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days):
    """(year, month, day) of a day count since 1970-01-01."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    y = yoe + era * 400
    return (y + 1 if m <= 2 else y), m, d


def weekday(days):
    """0 = Monday for a day count since 1970-01-01 (a Thursday)."""
    return (days + 3) % 7


def epoch_s(y, mo, d, h, mi, s):
    """UTC epoch seconds of a civil date and time."""
    return days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s


# ---- configuration ----
def merge(what, defaults, *layers):
    """A new dict: `defaults` (a dict, or a tuple of (key, value) pairs: see lookup())
    overridden by each layer in turn (None = nothing). A key that `defaults` does not
    have raises a ValueError that names `what` ("session config") and the known keys.
    (No keyword defaults: they cost a dict in the heap for as long as the meter runs.)"""
    out = dict(defaults)
    for layer in layers:
        if not layer:
            continue
        for k in layer:
            if k not in out:            # out has exactly the keys of defaults
                raise ValueError("%s: unknown key %r (known: %s)"
                          % (what, k, ", ".join(sorted(out))))
            out[k] = layer[k]
    return out


def lookup(pairs, key, default):
    """The value of `key` in a table of (key, value) pairs, else `default`. Fixed tables
    are tuples, not dicts: a constant tuple is frozen into flash with the code, while a
    dict literal at module level is built in the heap at import (docs/ram.md)."""
    for k, v in pairs:
        if k == key:
            return v
    return default


def pick(d, keys):
    """The entries of dict d (may be None) whose key is in `keys`: a shared settings dict
    (a board's DEFAULTS) handed to one subsystem."""
    out = {}
    if d:
        for k in d:
            if k in keys:
                out[k] = d[k]
    return out


# ---- modules loaded on use ----
def unload(name):
    """Forget module `name` (sys.modules and its package's attribute), so that its
    function objects and globals are freed once nothing else holds them: code a running
    meter calls rarely, loaded for the call (docs/decisions/0020)."""
    import sys
    sys.modules.pop(name, None)
    pkg, _, leaf = name.rpartition(".")
    parent = sys.modules.get(pkg) if pkg else None
    if parent is not None and leaf in getattr(parent, "__dict__", {}):
        delattr(parent, leaf)       # the package's attribute holds the module too
