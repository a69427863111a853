"""The driver's CRC-8 tables are literals (frozen into flash, no heap: docs/ram.md); this
recomputes them bit by bit from the datasheet's definition (polynomial 0x07, init 0, no
final XOR; SPI frames MSB first, UART frames LSB first) and checks whole frames."""
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "firmware"))

from drivers import stpm3x as d  # noqa: E402


def _crc_msb_first(data):
    c = 0
    for b in data:
        for i in range(7, -1, -1):
            top = ((c >> 7) & 1) ^ ((b >> i) & 1)
            c = ((c << 1) & 0xFF) ^ (0x07 if top else 0)
    return c


def _reverse8(x):
    return int("{:08b}".format(x)[::-1], 2)


def _crc_lsb_first(data):
    # the same CRC over each byte sent LSB first: the bits in the order the UART shifts them
    return _reverse8(_crc_msb_first(bytes(_reverse8(b) for b in data)))


def test_tables_are_the_crc_of_every_byte():
    assert isinstance(d._T_SPI, bytes) and len(d._T_SPI) == 256
    assert isinstance(d._T_UART, bytes) and len(d._T_UART) == 256
    for i in range(256):
        assert d._T_SPI[i] == _crc_msb_first(bytes((i,))), i
        assert d._T_UART[i] == _crc_lsb_first(bytes((i,))), i


def test_crc8_of_frames_matches_the_bitwise_crc():
    rnd = random.Random(7)
    for _ in range(500):
        frame = bytes(rnd.randrange(256) for _ in range(4))
        assert d.crc8(frame) == _crc_msb_first(frame)
        assert d.crc8(frame, uart=True) == _crc_lsb_first(frame)
