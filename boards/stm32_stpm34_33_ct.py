# Three-phase field meter: STM32F405 (pyboard pin names) + STPM34 (L1, L2) + STPM33 (L3)
# with 2000:1 CTs on 4.8 Ohm burdens (2.4 mV/A), as on ST's 3-phase evaluation board.
# Quectel BG95 NB-IoT modem on UART 4.
NAME = "stm32-stpm34-33-ct"
PHASES = 3
MAINS_HZ = 50
INTERFACE = "spi"
# SCS pulled up while the MCU boots: at power-up the chips select UART; the firmware
# starts them in SPI mode with an EN edge (chips with the same "en" share one EN pin).
SCS_POWERUP = 1
_CT = {"r1": 810000, "r2": 470, "sensor": "ct", "ks": 0.0024, "gain": 2,
       "sag_v": 184, "swell_v": 264, "swell_a": 80}
CHIPS = (
    {"part": "STPM34", "en": 0, "ch": (dict(_CT, phase=1), dict(_CT, phase=2))},
    {"part": "STPM33", "en": 0, "ch": (dict(_CT, phase=3),)},
)
TRANSPORTS = ("nbiot",)
DEFAULTS = {"read_ms": 1000, "interval_s": 900, "rt_s": 10, "fs": "/flash"}
WDT_MS = 8000                  # machine.WDT timeout (IWDG: up to 32 s)

# SPI1 (X6 SCK, X7 MISO, X8 MOSI); SCS X5 (STPM34), Y5 (STPM33); SYN tied: X4; EN tied: X3.
# BG95 PWRKEY through an NPN stage on Y6: Y6 high = key pressed (PWRKEY pulled low); the
# NB-IoT driver power-cycles a hung modem with it.
_PINS = {"spi": 1, "scs": ("X5", "Y5"), "syn": "X4", "en": ("X3",), "modem_uart": 4,
         "modem_pwrkey": "Y6"}


def build(opts=None):
    from machine import Pin, SPI, UART
    from clock import Clock
    from drivers.stpm3x import SpiLink
    from hw import Hardware
    p = _PINS
    spi = SPI(p["spi"], baudrate=8000000, polarity=1, phase=1)
    scs = [Pin(n, Pin.OUT, value=1) for n in p["scs"]]
    return Hardware(
        links=[SpiLink(spi, s) for s in scs],
        syn=Pin(p["syn"], Pin.OUT, value=1),
        en=[Pin(n, Pin.OUT, value=1) for n in p["en"]],
        clock=Clock(), fs="/flash",
        modem_uart=UART(p["modem_uart"], 115200, timeout=0),
        modem_pwrkey=Pin(p["modem_pwrkey"], Pin.OUT, value=0))
