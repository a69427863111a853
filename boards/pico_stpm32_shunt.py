# Single-phase meter: Raspberry Pi Pico (RP2040) + STPM32 with a 250 uOhm shunt,
# PLC modem on UART1. Pins follow ST's EVALSTPM32 wiring to a Pico header.
NAME = "pico-stpm32-shunt"
PHASES = 1
MAINS_HZ = 50
INTERFACE = "spi"
# SCS pulled up while the MCU boots: at power-up the chips select UART; the firmware
# starts them in SPI mode with an EN edge (chips with the same "en" share one EN pin).
SCS_POWERUP = 1
CHIPS = (
    {"part": "STPM32", "en": 0, "ch": (
        # 810k/470 divider; shunt 250 uOhm at PGA x16: ~27 mV rms at 107 A.
        {"phase": 1, "r1": 810000, "r2": 470, "sensor": "shunt", "ks": 0.00025, "gain": 16,
         "sag_v": 184, "swell_v": 264, "swell_a": 80},)},
)
TRANSPORTS = ("plc",)
DEFAULTS = {"read_ms": 1000, "interval_s": 900, "rt_s": 10, "fs": "/"}
WDT_MS = 8000                  # machine.WDT timeout (RP2040: at most 8388 ms)

# SPI0: SCK GP18, MOSI GP19, MISO GP16. SCS GP17, SYN GP20, EN GP21. PLC modem UART1 GP4/GP5.
_PINS = {"spi": 0, "sck": 18, "mosi": 19, "miso": 16, "scs": (17,), "syn": 20, "en": (21,),
         "plc_uart": (1, 4, 5)}


def build(opts=None):
    from machine import Pin, SPI, UART
    from clock import Clock
    from drivers.stpm3x import SpiLink
    from hw import Hardware
    p = _PINS
    # Mode 3, MSB first (datasheet: CPOL 1, CPHA 1); 8 MHz is well inside the 20 MHz limit.
    spi = SPI(p["spi"], baudrate=8000000, polarity=1, phase=1, sck=Pin(p["sck"]),
              mosi=Pin(p["mosi"]), miso=Pin(p["miso"]))
    scs = [Pin(n, Pin.OUT, value=1) for n in p["scs"]]
    uart_id, tx, rx = p["plc_uart"]
    return Hardware(
        links=[SpiLink(spi, s) for s in scs],
        syn=Pin(p["syn"], Pin.OUT, value=1),
        en=[Pin(n, Pin.OUT, value=1) for n in p["en"]],
        clock=Clock(), fs="/",
        plc_uart=UART(uart_id, baudrate=115200, tx=Pin(tx), rx=Pin(rx)))
