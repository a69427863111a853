# Bringing up the STPM3x chips of one meter together (reference "Pins and start-up"):
# - the interface (SCS low = SPI, high = UART) is latched at power-up and at an EN rising
#   edge; EN low wipes configuration and counters. Chips whose EN pins are tied together
#   are therefore started together: every SCS on the line is held at its chip's
#   interface level across the edge, or the chips whose SCS floats high come up in UART
#   mode and never answer SPI (issue 8: the field board's STPM33).
# - three SYN pulses with every SCS high reset every chip on the SYN line;
# - the software reset (DSP_CR3 bit 20) resets a chip's configuration rows and keeps
#   its data rows: the energy it counted since power-up survives.
# The caller (metering/chips.py) decides which chips need which reset; this module only
# does it with the right timing, and reports how each chip was reset.
from drivers.stpm3x import Stpm3xError
from drivers.stpm3x_cfg import syn_global_reset, POWER_US, RESET_US, SEL_US

try:
    from micropython import const
except ImportError:  # CPython, host-side tests
    def const(x):
        return x

RESET_NONE = const(0)   # not reset: still running with its configuration and counters
RESET_SW = const(1)     # software reset: configuration rows reset, data rows kept
RESET_EN = const(2)     # EN edge: everything reset, interface chosen again
RESET_SYN = const(3)    # SYN global reset: everything reset (interface kept)


def en_line_of(chips, i):
    """Indices of the chips that share chip i's EN pin (i itself included); [i] when
    it has none."""
    en = chips[i].en
    if en is None:
        return [i]
    return [j for j in range(len(chips)) if chips[j].en is en]


def start_chips(chips, hard=0, soft=0, syn=None):
    """Reset chips of one meter. `hard`: mask of chips that need a hardware reset (they
    do not answer, or their state cannot be trusted); `soft`: mask of chips that answer
    and get the software reset. A hard chip with an EN pin is reset by an EN cycle of
    its whole line (the chips sharing it are reset too: they are added to the result);
    a hard chip without EN gets the SYN global reset, which resets every chip on the
    SYN line. Returns (kinds, errors): per chip RESET_*, and per chip None or the
    Stpm3xError that chip raised when it was read back (a dead chip must not stop the
    other phases)."""
    n = len(chips)
    kinds = [RESET_NONE] * n
    errors = [None] * n
    if not n:
        return kinds, errors
    sl = chips[0]._sleep
    done = 0
    global_reset = False
    for i in range(n):
        if not hard & (1 << i) or done & (1 << i):
            continue
        if chips[i].en is None:
            global_reset = True
            continue
        line = en_line_of(chips, i)
        en = chips[i].en
        en.value(0)                              # EN low: configuration wiped
        sl(SEL_US)
        for j in line:
            scs = chips[j].link.scs
            if scs is not None:
                scs.value(chips[j].scs_level())  # each chip's interface at the edge
        en.value(1)
        sl(SEL_US)
        for j in line:
            scs = chips[j].link.scs
            if scs is not None:
                scs.value(1)
            kinds[j] = RESET_EN
            done |= 1 << j
    if done:
        sl(POWER_US)                             # >= 35 ms after the EN rising edge
    if global_reset:
        if syn is None:
            for i in range(n):
                if hard & (1 << i) and not done & (1 << i):
                    errors[i] = Stpm3xError(
                        "STPM3x (%s) does not answer and has neither EN nor SYN to reset "
                        "it: check wiring and the SCS level at power-up" % chips[i].part)
        else:
            for c in chips:                      # every SCS high: all count the pulses
                if c.link.scs is not None:
                    c.link.scs.value(1)
            syn_global_reset(syn, sl)
            for i in range(n):
                if chips[i].syn is syn:
                    kinds[i] = RESET_SYN
    for i in range(n):
        if soft & (1 << i) and kinds[i] == RESET_NONE:
            chips[i].sw_reset_frame()
            kinds[i] = RESET_SW
    for i in range(n):
        if kinds[i] != RESET_NONE:
            chips[i].comm_reset()
            if kinds[i] != RESET_SW:
                chips[i]._defaults()
    if any(kinds):
        sl(RESET_US)
    for i in range(n):
        if kinds[i] == RESET_NONE or errors[i] is not None:
            continue
        try:
            chips[i].reload(soft=kinds[i] == RESET_SW)
        except Stpm3xError as e:
            errors[i] = e
    return kinds, errors


def restart_line(chips, i, syn=None):
    """Runtime recovery of chip i (silent, or lost its setup): the chips on its EN line
    are restarted with it (one EN edge resets them all); without EN, the software reset
    if it answers, else the SYN global reset. Returns (kinds, errors) as start_chips;
    the caller restores the configuration of every chip whose kind is not RESET_NONE."""
    c = chips[i]
    if c.en is None and c.probe() is not None:
        return start_chips(chips, soft=1 << i, syn=syn)
    return start_chips(chips, hard=1 << i, syn=syn)


def recover(group, i):
    """Restart chip i of a ChipGroup after snapshot() flagged it (not allocation-free),
    and with it every chip on its EN line (one EN edge resets them all); each restarted
    chip gets its configuration back from its shadow. Returns the mask of chips whose
    counters restarted. Raises Stpm3xError if chip i still does not answer. (Here, not a
    ChipGroup method: a running meter calls it rarely and does not hold it; docs/ram.md.)"""
    chips = group.chips
    saved = [c.saved_setup() for c in chips]
    kinds, errors = restart_line(chips, i, group.syn)
    mask = 0
    for j in range(group.n):
        if kinds[j] == RESET_NONE:
            continue
        if errors[j] is None:
            try:
                chips[j].rewrite(saved[j])
            except Stpm3xError as e:
                errors[j] = e
        mask |= 1 << j
    if errors[i] is not None:
        raise errors[i]
    return mask
