# Three-phase meter on an ESP32-S3 with Wi-Fi, a BG95 NB-IoT modem as fallback, and the
# same STPM34 + STPM33 CT front end as the field meter.
NAME = "esp32s3-stpm34-33-ct"
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
TRANSPORTS = ("wifi", "nbiot")
DEFAULTS = {"read_ms": 1000, "interval_s": 900, "rt_s": 10, "fs": "/"}
WDT_MS = 8000                  # machine.WDT timeout (firmware/watchdog.py)

# SPI2 (FSPI): SCK 12, MOSI 11, MISO 13. SCS 10 (STPM34), 9 (STPM33). SYN 14, EN 21.
# BG95 on UART1: TX 17, RX 18.
_PINS = {"spi": 2, "sck": 12, "mosi": 11, "miso": 13, "scs": (10, 9), "syn": 14, "en": (21,),
         "modem_uart": (1, 17, 18)}


def build(opts=None):
    from machine import Pin, SPI, UART
    import network
    from clock import Clock
    from drivers.stpm3x import SpiLink
    from hw import Hardware
    p = _PINS
    spi = SPI(p["spi"], baudrate=8000000, polarity=1, phase=1, sck=Pin(p["sck"]),
              mosi=Pin(p["mosi"]), miso=Pin(p["miso"]))
    scs = [Pin(n, Pin.OUT, value=1) for n in p["scs"]]
    uid, tx, rx = p["modem_uart"]
    return Hardware(
        links=[SpiLink(spi, s) for s in scs],
        syn=Pin(p["syn"], Pin.OUT, value=1),
        en=[Pin(n, Pin.OUT, value=1) for n in p["en"]],
        clock=Clock(), fs="/",
        modem_uart=UART(uid, baudrate=115200, tx=tx, rx=rx, timeout=0),
        wlan=network.WLAN(network.STA_IF))
