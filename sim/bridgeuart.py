# The bridge's UART link (sim/bridgelink.py), for a board whose chips talk UART
# (unix_sim_1ph): kept out of bridgelink so that an SPI board's interpreter does not load
# it, nor the machine.UART surface it shares with the in-process fakes (sim/hwapi.py).
from sim.hwapi import UARTBase


class LinkUART(UARTBase):
    """machine.UART look-alike wired to one chip: write() sends the bytes and collects the
    reply bytes that reached this UART at its baud rate; any() / readinto() read them."""

    def __init__(self, bridge, index, baudrate=9600):
        UARTBase.__init__(self, baudrate)
        self._br = bridge
        self._index = index
        bridge.baud(index, baudrate)

    def init(self, baudrate=None, bits=8, parity=None, stop=1, **kwargs):
        UARTBase.init(self, baudrate, bits, parity, stop, **kwargs)
        if baudrate is not None:
            self._br.baud(self._index, baudrate)

    def write(self, buf):
        n = len(buf)
        self._br.uart(self._index, buf, n, self.rx)
        return n
