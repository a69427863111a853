# What a board's build() hands to main.py: the buses and pins it constructed.
# A board module is data plus build(); this class is the only shape main.py relies on.


class Hardware:
    # Keyword arguments, not defaults: a function with 12 default values is 48 bytes more
    # of heap for as long as the meter runs (docs/ram.md, 2026-11-30).
    def __init__(self, links, **kw):
        g = kw.pop
        self.links = links          # one driver link per chip, in CHIPS order
        self.syn = g("syn", None)   # shared SYN pin, or None for the software latch
        self.en = g("en", ())       # EN pins (may be empty when EN is tied high)
        self.clock = g("clock", None)  # clock.Clock or a virtual clock from sim/vclock.py
        self.fs = g("fs", "/")      # directory for persistent files
        self.modem_uart = g("modem_uart", None)  # NB-IoT modem UART, if fitted
        self.modem_pwrkey = g("modem_pwrkey", None)  # its PWRKEY (Pin, 1 = pressed), if wired
        self.plc_uart = g("plc_uart", None)  # PLC modem UART, if fitted
        self.wlan = g("wlan", None)  # network.WLAN interface, if the MCU has Wi-Fi
        self.sim = g("sim", None)   # simulation boards only: the simulated hardware
        self.led = g("led", None)
        self.wdt = g("wdt", None)   # watchdog constructor wdt(timeout=ms) -> .feed(); None:
        #                             machine.WDT (firmware/watchdog.py)
        self.stop = g("stop", None)  # shutdown request input (Pin-like, 1 = stop cleanly), or None
        if kw:
            raise TypeError("Hardware: unknown argument(s) %s (a board's build() passes "
                            "only what hw.py lists)" % ", ".join(sorted(kw)))
