# The STPM3x power-offset code (DSP_CR9..12), part of the register map
# (drivers/stpm3x_map.py re-exports all of it) kept in a module of its own: the set-up
# side (drivers/stpm3x_cfg.py) uses these functions, and a function keeps its module's
# globals alive: here that is 4 names, in the map 163. The firmware drops both after the
# boot (metering/chips.py, docs/ram.md); a calibration imports them again.
#
# Unconfirmed point (reference: "power-offset sign encoding unconfirmed"), decided here
# and only here: OFA/OFAF/OFR/OFS are 10-bit two's complement, in units of
# OFFSET_LSB_P power-row LSB, ADDED to the measured power (a negative code subtracts).
# sim/physics.py decodes with offset_value(); why: docs/decisions/0005-one-register-map.md
try:
    from micropython import const
except ImportError:  # CPython: host tests and the simulator's host process
    def const(x):
        return x

OFFSET_MASK = const(0x3FF)    # 10 bits; LSB = 4 power-row LSB (sign: see offset_code)


def offset_code(v):
    """10-bit register code of a power offset of v units (-512..511)."""
    if not isinstance(v, int) or not -512 <= v <= 511:
        raise ValueError("power offset %r: must be an int -512..511" % (v,))
    return v & OFFSET_MASK


def offset_value(code):
    """Signed offset (in OFFSET_LSB_P power-row LSB) of a 10-bit register code."""
    code &= OFFSET_MASK
    return code - 0x400 if code & 0x200 else code
