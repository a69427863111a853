# The UART a unix simulation board hands over for a modem that sits behind a pty (the
# NB-IoT emulator sim/modem.py, the PLC concentrator sim/plc.py): machine.UART's readinto /
# write / any on a tty path, non-blocking. Defined in sim/bridgelink.py, the one module of
# sim/ a bridged board loads into the firmware's interpreter (docs/decisions/0017).
from sim.bridgelink import PtyUart  # noqa: F401
