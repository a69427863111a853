# Virtual single-phase meter for the MicroPython unix port: STPM32 with a shunt, talking
# UART (the chip's other interface), simulated byte for byte by sim/.
NAME = "unix-sim-1ph"
PHASES = 1
MAINS_HZ = 50
INTERFACE = "uart"
# SCS pulled up while the MCU boots: the chip comes up in UART mode, the interface used.
SCS_POWERUP = 1
CHIPS = (
    {"part": "STPM32", "en": 0, "ch": (
        {"phase": 1, "r1": 810000, "r2": 470, "sensor": "shunt", "ks": 0.00025, "gain": 16,
         "sag_v": 184, "swell_v": 264, "swell_a": 80},)},
)
TRANSPORTS = ("wifi", "nbiot", "plc")
DEFAULTS = {"read_ms": 1000, "interval_s": 900, "rt_s": 10, "fs": "/flash"}
WDT_MS = 8000                  # the board's watchdog (the host's, over the bridge)


def build(opts=None):
    import sys
    from sim import bridgelink
    opts = opts or {}
    if bridgelink.bridge_path(opts):      # the chips in the host: load nothing else of sim/
        return bridgelink.build(sys.modules[__name__], opts)
    from sim import unixboard
    return unixboard.build(sys.modules[__name__], opts)
