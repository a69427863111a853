# Virtual three-phase meter for the MicroPython unix port: the field meter's front end
# (STPM34 for L1/L2 + STPM33 for L3, CTs) simulated byte for byte by sim/.
NAME = "unix-sim-3ph"
PHASES = 3
MAINS_HZ = 50
INTERFACE = "spi"
# SCS pulled up while the MCU boots: at power-up the chips select UART; the firmware
# starts them in SPI mode with an EN edge (chips with the same "en" share one EN pin).
SCS_POWERUP = 1
_CT = {"r1": 810000, "r2": 470, "sensor": "ct", "ks": 0.0024, "gain": 2,
       "sag_v": 184, "swell_v": 264, "swell_a": 80}
CHIPS = (
    {"part": "STPM34", "en": 0, "ch": (dict(_CT, phase=1), dict(_CT, phase=2))},
    {"part": "STPM33", "en": 0, "ch": (dict(_CT, phase=3),)},
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
