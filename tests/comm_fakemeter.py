# A Meter-like object for command and session tests (runs on micropython and CPython).
class FakeMeter:
    def __init__(self):
        self.cfg = {"rt_s": 10, "interval_s": 900, "payload": "bin"}
        self.regs = {"ai_wh": 5000, "ae_wh": 10}
        self.log = []
        self.t = None
        self.sinks = []

    def readings(self):
        return {"t": 1767225600, "v_mv": [230000], "p_mw": [1000000]}

    def counters(self):
        return dict(self.regs)

    def config_get(self):
        return dict(self.cfg)

    def config_set(self, k, v):
        if k == "interval_s" and v == 60:
            raise ValueError("60 s intervals need a synced clock")
        self.cfg[k] = v
        self.log.append(("set", k))

    def preset_counters(self, values, phase=None):
        if not values:
            for k in self.regs:
                self.regs[k] = 0
        self.regs.update(values)
        self.log.append(("preset", phase))

    async def calibrate(self, args):
        self.log.append(("cal", args["phase"]))
        return {"chv": 2048}

    def raw_rows(self, chip, rows):
        return [r * 0x01010101 for r in rows]

    def set_time(self, t):
        self.t = t

    def reboot(self):
        self.log.append(("reboot",))
