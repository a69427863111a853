# What the unix simulation boards build: the chips' buses and pins, a virtual clock, a
# littlefs filesystem on a simulated flash (a host file, kept across runs with --state),
# and the UARTs of the modems behind a pty. Runs on the MicroPython unix port and CPython.
#
# Two ways to the chips (docs/decisions/0004):
#  --bridge PATH  the simulated board runs in a host process (sim/bridge.py, started by
#                 `lipari meter`); the firmware gets link objects that speak the bridge
#                 (sim/bridgelink.py): only they sit in the MicroPython heap, with the
#                 board's watchdog and shutdown line. What RAM figures are measured on.
#                 The board module calls sim.bridgelink.build then, and this module is
#                 not loaded (decision 0017).
#  otherwise      the chips run in this process behind fake buses (sim/bus.py): fast
#                 tests that look inside the chips, the heap-locked acquire test.
from sim.bridgelink import (FileDev, mount, clock_from, pty_uart, mcu_boot,  # noqa: F401
                            bridge_path, FS_BLOCK, FS_BLOCKS, MOUNT, MCU_BOOT_MS)


def build(board, opts=None):
    """The board's Hardware: its chips behind the bridge when a bridge is given, else in
    this process behind fake buses."""
    opts = opts or {}
    if bridge_path(opts):
        from sim import bridgelink
        return bridgelink.build(board, opts)
    modem = pty_uart(opts.get("modem"), "NB-IoT modem", "modem")
    plc = pty_uart(opts.get("plc"), "PLC modem", "plc")
    hw = _in_process(board, opts)
    hw.modem_uart = modem
    hw.plc_uart = plc
    return hw


def sim_board(board, clock, profile="household", seed=0, sensor_errors=False):
    """The board's simulated hardware (sim/bus.py SimBoard), in this process or in the
    bridge's host (sim/bridge.py): one place that turns a board module into chips."""
    from sim.bus import SimBoard
    return SimBoard(board.CHIPS, interface=board.INTERFACE,
                    mains_hz=getattr(board, "MAINS_HZ", 50), profile=profile,
                    seed=int(seed), clock=clock, errors=bool(sensor_errors),
                    scs_powerup=getattr(board, "SCS_POWERUP", None))


def _in_process(board, opts):
    from drivers.stpm3x import SpiLink
    from hw import Hardware
    clock = clock_from(opts)
    sb = sim_board(board, clock, opts.get("profile", "household"), opts.get("seed", 0),
                   opts.get("sensor_errors"))
    mcu_boot(clock, opts)
    n = len(sb.chips)
    if board.INTERFACE == "spi":
        links = [SpiLink(sb.spi, sb.scs[i]) for i in range(n)]
    else:
        from drivers.stpm3x_uart import UartLink      # a UART board's link only
        links = [UartLink(sb.uarts[i], sb.scs[i]) for i in range(n)]
    fs = mount(opts.get("state"))
    return Hardware(links, syn=sb.syn, en=sb.en, clock=clock, fs=fs, sim=sb)
