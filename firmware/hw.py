# What a board's build() hands to main.py: the buses and pins it constructed.
# A board module is data plus build(); this class is the only shape main.py relies on.


class Hardware:
    def __init__(self, links, syn=None, en=(), clock=None, fs="/", modem_uart=None,
                 plc_uart=None, wlan=None, sim=None, led=None, wdt=None, stop=None,
                 modem_pwrkey=None):
        self.links = links          # one driver link per chip, in CHIPS order
        self.syn = syn              # shared SYN pin, or None for the software latch
        self.en = en                # EN pins (may be empty when EN is tied high)
        self.clock = clock          # clock.Clock or a virtual clock from sim/vclock.py
        self.fs = fs                # directory for persistent files
        self.modem_uart = modem_uart  # NB-IoT modem UART, if fitted
        self.modem_pwrkey = modem_pwrkey  # its PWRKEY (Pin, 1 = pressed), if wired
        self.plc_uart = plc_uart    # PLC modem UART, if fitted
        self.wlan = wlan            # network.WLAN interface, if the MCU has Wi-Fi
        self.sim = sim              # simulation boards only: the simulated hardware
        self.led = led
        self.wdt = wdt              # watchdog constructor wdt(timeout=ms) -> .feed(); None:
        #                             machine.WDT (firmware/watchdog.py)
        self.stop = stop            # shutdown request input (Pin-like, 1 = stop cleanly), or None
