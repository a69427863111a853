"""The driver's derived constants are const() literals (no heap, inlined on the board:
docs/ram.md); each must equal its derivation from the register table, recomputed here on
CPython (where const() is the identity, so the names exist as module attributes)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "firmware"))

from drivers import stpm3x as d  # noqa: E402
from drivers import stpm3x_map as m  # noqa: E402
from drivers import stpm3x_cfg as g  # noqa: E402


def test_derived_constants_match_the_register_table():
    want = {
        "_CR3_LATCH_HI": (m.CR3_LATCH1 | m.CR3_LATCH2) >> 16,
        "_CR3_SELF_HI": m.CR3_NOT_COMPARED >> 16,
        "_US1_KNOWN": m.US1_CRC_POLY | m.US1_CRC_EN | m.US1_LSB_FIRST,
        "_U3_CRC_B2": (m.US3_CRC_ERRORS >> 16) & 0xFF,
        "_U3_CRC_B3": m.US3_CRC_ERRORS >> 24,
        "_U3_BUS_B2": (m.US3_BUS_ERRORS >> 16) & 0xFF,
        "_U3_BUS_B3": m.US3_BUS_ERRORS >> 24,
        "_SR_STUCK_B2": (m.SR_C_STUCK >> 16) & 0xFF,
        "_SR_STUCK_B3": m.SR_V_STUCK >> 24,
        "_SR_PER_B3": m.SR_PER_ERR >> 24,
        "_SNAP_END_1CH": m.PH1_REG1 + m.PH_STRIDE,
        "_SNAP_END_2CH": m.PH1_REG1 + 2 * m.PH_STRIDE,
        "_SNAP_DATA": 4 * len(d._SNAP_HEAD),
        "_O_US1": 4 * (m.US_REG1 - m.DSP_SR1),
        "_O_US3": 4 * (m.US_REG3 - m.DSP_SR1),
        "_SH_US1": 4 * m.US_REG1,
    }
    for name, value in want.items():
        assert getattr(d, name) == value, name
    # the set-up side's (drivers/stpm3x_cfg.py)
    want = {
        "_CR3_SWRST_HI": m.CR3_SW_RESET >> 16,
        "_US1_CANARY": g._CANARY_MS << m.US1_TIMEOUT_SHIFT,
        "_DFE_EN": m.DFE_ENV | m.DFE_ENC,
        "_TRIES": d._TRIES,
        "_N_CFG": d._N_CFG,
    }
    for name, value in want.items():
        assert getattr(g, name) == value, name
    from metering import api             # the command calls (the map is gone at run time)
    assert api._CHX_MID == m.CHX_MID


def test_register_map_values_copied_as_consts_match_the_map():
    """The driver, metering.phases and metering.energy read register-map values as
    `_NAME = const(...)` literals (no dict slot; docs/ram.md): each equals the map's NAME."""
    from metering import phases, energy
    for mod, least in ((d, 20), (phases, 20), (energy, 3)):
        names = [n for n in dir(mod) if n[:1] == "_" and hasattr(m, n[1:])
                 and isinstance(getattr(mod, n), int)]
        assert len(names) >= least, (mod.__name__, names)
        for n in names:
            assert getattr(mod, n) == getattr(m, n[1:]), (mod.__name__, n)
    from metering import records
    for n in ("AI", "AE", "RQ1", "AP", "T0"):
        assert getattr(records, "_" + n) == getattr(energy, n), n
