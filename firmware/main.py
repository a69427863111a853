# Lipari meter firmware entry point: wires a board to the metering engine and, when
# configured, to the MQTT session. On a board this runs at boot (board.py and
# /config.json beside it); on the unix port the same file runs with command-line options:
#
#   micropython main.py --board unix_sim_3ph --profile household --step --days 1
import sys
import gc

try:
    import asyncio
except ImportError:  # pragma: no cover
    import uasyncio as asyncio
try:
    import json
except ImportError:  # pragma: no cover
    import ujson as json

from version import VERSION  # noqa: F401  (the one version: firmware/version.py)
from util import sleep_ms

# The switch record (a dict) when the bootstrap (boot.py) started this firmware from a
# slot; None when main.py runs directly. The OTA agent needs it (ota/agent.py).
BOOT = None

# Options that take no value.
_FLAGS = ("step", "sensor_errors", "no_comm")
# Options that take a value, with the type they convert to.
# Options that take a value, and its type (s: text, i: integer, f: number). A tuple of
# constants is frozen into flash with the code; a dict literal would be built in the heap
# at import and kept (~0.2 KiB; docs/ram.md).
_OPTS = (("board", "s"), ("profile", "s"), ("speed", "f"), ("seed", "i"), ("days", "f"),
         ("state", "s"), ("print", "s"), ("interval", "i"), ("read_ms", "i"),
         ("broker", "s"), ("transport", "s"), ("id", "s"), ("modem", "s"), ("plc", "s"),
         ("creds", "s"), ("start", "i"), ("payload", "s"), ("rt", "i"), ("bridge", "s"))
_PRINT = ("json", "summary", "none")
# A shutdown request (the board's stop line): how often it is polled (meter's time), and
# the bounds of the goodbye (real time): queue drain, then offline status + DISCONNECT.
_STOP_POLL_MS = 500
_STOP_DRAIN_MS = 1000
_STOP_CLOSE_MS = 3000
_GC_MS = 1000           # garbage collection period (meter time): Run._collect


class ConfigError(Exception):
    pass


def parse_args(argv):
    """--name value / --flag pairs into a dict; a clear error for anything else."""
    opts = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise ConfigError("unexpected argument %r (options start with --)" % a)
        k = a[2:].replace("-", "_")
        if k in _FLAGS:
            opts[k] = True
            i += 1
            continue
        t = None
        for name, code in _OPTS:
            if name == k:
                t = str if code == "s" else int if code == "i" else float
        if t is None:
            raise ConfigError("unknown option --%s; known: %s" % (
                k, ", ".join(sorted([n for n, _ in _OPTS] + list(_FLAGS)))))
        if i + 1 >= len(argv):
            raise ConfigError("option --%s needs a value" % k)
        try:
            opts[k] = t(argv[i + 1])
        except ValueError:
            raise ConfigError("option --%s: %r is not a %s" % (k, argv[i + 1], t.__name__))
        i += 2
    if opts.get("print", "json") not in _PRINT:
        raise ConfigError("--print must be one of %s" % ", ".join(_PRINT))
    return opts


def load_config(path):
    """/config.json on a board: the same keys as the command-line options."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError:
        return {}
    except ValueError as e:
        raise ConfigError("%s is not valid JSON (%s); fix or delete it" % (path, e))
    if not isinstance(cfg, dict):
        raise ConfigError("%s must hold a JSON object" % path)
    return cfg


def out(kind, rec):
    """One JSON line per record on the console: `lipari meter` reads these. The line is
    made as one small string per field, all of them before the first is written (a
    MemoryError prints nothing, never half a line; the record's sink is offered it
    again), without a copy of the record or a string of the whole line: at a 64 KiB heap
    neither found a free block of its size (docs/ram.md)."""
    parts = ['{"type": ' + json.dumps(kind)]
    for k in rec:
        if k != "type":
            parts.append(", %s: %s" % (json.dumps(k), json.dumps(rec[k])))
    parts.append("}\n")
    w = sys.stdout.write
    for p in parts:
        w(p)


class Run:
    """One meter: board hardware, metering engine, optional MQTT session."""

    def __init__(self, opts):
        self.opts = opts
        name = opts.get("board", "board")
        try:
            self.board = __import__(name)
        except ImportError as e:
            raise ConfigError("board %r not found (%s): on a board, deploy one as /board.py; "
                              "on the unix port, pass --board <module in boards/>" % (name, e))
        try:
            self.hw = self.board.build(opts)
        except ValueError as e:      # an option the board cannot honour (OSError: hardware)
            raise ConfigError("board %s: %s" % (name, e))
        self.clock = self.hw.clock
        self.summary = {"intervals": 0, "events": 0, "rt": 0}
        self.session = None

    def meter_cfg(self):
        o = self.opts
        cfg = {}
        if "interval" in o:
            cfg["interval_s"] = o["interval"]
        if "read_ms" in o:
            cfg["read_ms"] = o["read_ms"]
        if "rt" in o:
            cfg["rt_s"] = o["rt"]
        return cfg

    def count(self, kind, rec):
        k = "intervals" if kind == "interval" else ("events" if kind == "event" else kind)
        self.summary[k] = self.summary.get(k, 0) + 1

    def start(self):
        from metering.engine import boot
        from metering.store import Store
        store = Store(self.hw.fs)
        sinks = [self.count]
        mode = self.opts.get("print", "json")
        if mode == "json":
            sinks.append(self._print_sink)
        comm = self.opts.get("broker") and not self.opts.get("no_comm")
        if comm:
            # the boot events come before the session exists: keep them for it
            from comm.wiring import EarlySink
            self.early = EarlySink(16)
            sinks.append(self.early)
        self.meter = boot(self.hw, self.board, store, self.meter_cfg(), sinks)
        if comm:
            gc.collect()        # the session's buffers into a compact heap (docs/ram.md)
            from comm.wiring import start_session, WiringError
            try:
                self.session = start_session(self.opts, self.hw, self.board, self.meter,
                                             self.early)
            except WiringError as e:
                raise ConfigError(str(e))
        return self.meter

    def _print_sink(self, kind, rec):
        if kind != "rt":
            out(kind, rec)

    async def run(self):
        m = self.start()
        tasks = [asyncio.create_task(m.run())]
        if self.session is not None:
            tasks.append(asyncio.create_task(self.session.run()))
            if BOOT is not None:
                from ota.agent import attach
                self.ota = attach(self.session, self.meter, self.clock, self.board, BOOT,
                                  self.opts.get("ota"))
        tasks.append(asyncio.create_task(self._collect()))
        import watchdog
        self.watchdog = watchdog.start(self.hw, self.board, m, self.session)
        if self.watchdog is not None:
            tasks.append(asyncio.create_task(self.watchdog.run()))
        stopped = await self._until_end(tasks[0])
        if self.watchdog is not None:
            self.watchdog.stopping = True    # metering ends on purpose; the goodbye is bounded
        if self.session is not None:
            # deliver what is queued before stopping (comm/wiring.py); on a shutdown
            # request at once, with short bounds (a supervisor is waiting)
            from comm.wiring import finish, comm_stats
            if stopped:
                self.summary["unsent"] = await finish(self.session, m, self.clock, tasks[0],
                                                      _STOP_DRAIN_MS, False, _STOP_CLOSE_MS)
            else:
                self.summary["unsent"] = await finish(self.session, m, self.clock, tasks[0],
                                                      60000, True, 5000)
            self.summary["comm"] = comm_stats(self.session)
        for t in tasks:
            t.cancel()
        await sleep_ms(0)
        m.checkpoint()
        s = dict(self.summary)
        if stopped:
            s["stopped"] = True
        s["ai_wh"] = m.wh(0)
        s["ae_wh"] = m.wh(1)
        s["valid"] = m.valid
        s["cycles"] = m.cycles
        gc.collect()
        s["mem_free"] = gc.mem_free()
        out("summary", s)
        if self.watchdog is not None:
            self.watchdog.release()          # the loop is over: hand the board back

    async def _collect(self):
        """Collect garbage every second of the meter's time, between two steps of the
        other tasks: the heap is collected at a quiet moment instead of inside a metering
        cycle when it fills up, and new objects then fill the holes at the bottom of the
        heap (the allocator starts there after a collection), which keeps the largest
        free block large over a month (docs/ram.md)."""
        while True:
            gc.collect()
            await self.clock.sleep_ms(_GC_MS)

    async def _until_end(self, meter_task):
        """Wait until --days of the meter's time have passed (returns False) or the
        board's shutdown line rises (True: SIGTERM / Ctrl-C to the unix board's host);
        with neither, as long as the meter runs."""
        days = self.opts.get("days")
        stop = getattr(self.hw, "stop", None)
        if stop is None:
            if days is None:
                await meter_task
            else:
                await self.clock.sleep_ms(int(days * 86400000))
            return False
        clock = self.clock
        left = None if days is None else int(days * 86400000)
        while left is None or left > 0:
            if stop.value():
                return True
            if meter_task.done():
                await meter_task             # its exception ends the run
                return False
            ms = _STOP_POLL_MS if left is None else min(left, _STOP_POLL_MS)
            t0 = clock.ticks_ms()
            await clock.sleep_ms(ms)
            if left is not None:
                left -= clock.ticks_diff(clock.ticks_ms(), t0)
        return False

    def interrupted(self):
        """Ctrl-C at the console: the KeyboardInterrupt ended the event loop wherever it
        was. As the clean stop does: say offline and disconnect (bounded), checkpoint."""
        m = getattr(self, "meter", None)
        if m is None:
            return
        s = self.session
        if s is not None:
            async def close():
                from util import wait_ms
                await wait_ms(s.close(), _STOP_CLOSE_MS)
            try:
                asyncio.new_event_loop()     # drop the interrupted loop's tasks
                asyncio.run(close())
            except (Exception, KeyboardInterrupt):
                pass
        m.checkpoint()
        wd = getattr(self, "watchdog", None)
        if wd is not None:
            wd.release()             # an installer at the console: no reset under them


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    r = None
    try:
        opts = load_config("config.json")
        opts.update(parse_args(argv))
        r = Run(opts)
        asyncio.run(r.run())
    except ConfigError as e:
        out("error", {"msg": str(e)})
        sys.exit(2)
    except KeyboardInterrupt:
        if r is not None:
            r.interrupted()
    except Exception as e:
        # e.g. a chip that does not answer ("check wiring"): say it on the console; a
        # board then restarts after a pause (the fault may be a loose connector or a
        # brown-out), the unix port exits non-zero for its supervisor
        out("error", {"msg": "%s: %s" % (type(e).__name__, e)})
        try:
            import machine
            reset = getattr(machine, "reset", None)
        except ImportError:
            reset = None
        if reset is not None:
            import time
            time.sleep(30)
            reset()
        sys.exit(1)


if __name__ == "__main__":
    main()
