"""Helpers for the comm/ingest tests and the lead's benchmark.

Measurements (sizes in bytes):
    interval_bin_size()   binary v1 interval record, 3 phases, 2 tariffs (goal <= 64)
    interval_wire_size()  the same as one MQTT QoS 1 PUBLISH (fixed header, topic, packet id)
    interval_json_size()  the same record as JSON
Each encodes with the firmware codec on the real micropython binary (mp=True, default) or
imported under CPython (mp=False).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MP = os.path.join(ROOT, ".venv", "bin", "micropython")
MPPATH = ":".join([".frozen", os.path.join(ROOT, "firmware"), os.path.join(ROOT, "tests"), ROOT])

# A realistic 3-phase household interval after a year of use.
SAMPLE_INTERVAL = {
    "seq": 35040, "t_end": 1767225600, "dur_s": 900, "flags": 0, "tariff": 1,
    "ai_wh": 5123456, "ae_wh": 0, "rq_varh": [812345, 0, 0, 301234], "ap_vah": 5501234,
    "ai_ph_wh": [1712345, 1698765, 1712346], "ae_ph_wh": [0, 0, 0],
    "v_min_mv": [228100, 229050, 227480], "v_max_mv": [233900, 234400, 232990],
    "v_avg_mv": [230870, 231420, 230110], "pmax_w": 4210, "sags": [0, 0, 0],
    "swells": [0, 0, 0], "tariff_wh": [3123456, 2000000], "ph_invalid": 0,
}
# The same record as a three-phase meter usually sends it: the total import is the floor
# of the exact sum of the phases, each phase register the floor of its own, so ai_wh is
# one more than sum(ai_ph_wh) (layout bit 6 off); the tariff registers add up to ai_wh.
SAMPLE_INTERVAL_USUAL = dict(SAMPLE_INTERVAL, ai_wh=5123457, tariff_wh=[3123456, 2000001])
SAMPLE_EVENT = {"seq": 812, "t": 1767225000, "kind": "sag", "phase": 2, "value": 183000}
SAMPLE_RT = {"t": 1767225610, "valid": 7, "v_mv": [230870, 231420, 230110],
             "i_ma": [5210, 1200, 800], "p_mw": [1180000, 270000, -150000],
             "q_mvar": [120000, -30000, 0], "s_mva": [1202000, 277000, 184000],
             "pf_milli": [982, 975, -815], "f_ph_mhz": [50012, 50011, 50012],
             "angle_mdeg": [10800, 12700, -144600], "f_mhz": 50012,
             "p_mw_total": 1300000, "q_mvar_total": 90000, "s_mva_total": 1663000,
             "ai_wh": 5123456, "ae_wh": 12, "tariff": 1}


def run_mp(code, timeout=60, env=None, heapsize=None, cwd=None):
    """Run a script on the micropython binary with the firmware on MICROPYPATH.
    Returns stdout; raises AssertionError with stderr if it fails."""
    e = dict(os.environ, MICROPYPATH=MPPATH)
    if env:
        e.update(env)
    args = [MP] + (["-X", "heapsize=%s" % heapsize] if heapsize else []) + ["-c", code]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)
    if p.returncode:
        raise AssertionError("micropython failed (%d):\n%s\n%s" % (p.returncode, p.stdout, p.stderr))
    return p.stdout


def mp_encode(items):
    """[(kind, rec, fmt)] -> [bytes] encoded by firmware/comm/codec.py on micropython."""
    code = ("import json, binascii\nfrom comm import codec\n"
            "for k, r, f in json.loads(%r):\n"
            "    try:\n"
            "        print(binascii.hexlify(codec.encode(k, r, f)).decode())\n"
            "    except codec.CodecError as e:\n"
            "        print('ERR', e)\n" % json.dumps(items))
    out = run_mp(code).split("\n")[:len(items)]
    return [None if o.startswith("ERR") else bytes.fromhex(o) for o in out]


def _encode(kind, rec, fmt, mp):
    if mp:
        return mp_encode([(kind, rec, fmt)])[0]
    sys.path.insert(0, os.path.join(ROOT, "firmware"))
    from comm import codec
    return codec.encode(kind, rec, fmt)


def publish_size(topic, payload_len, qos=1):
    """Bytes of one MQTT 3.1.1 PUBLISH packet."""
    rem = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    n = 1
    while rem >= 128 ** n:
        n += 1
    return 1 + n + rem


# A scripted MQTT Conn for micropython scripts (prepend to a script): FakeConn(data, chunk)
# hands `data` (a CONNACK first; extend conn.data to feed more) to the client `chunk` bytes
# at a time and keeps what the client sends; pub() makes a PUBLISH (QoS 1 with a pid, else 0)
MP_FAKE_CONN = r"""
import asyncio
class FakeConn:
    name = "fake"
    def __init__(self, data=b"\x20\x02\x00\x00", chunk=97):
        self.data = bytearray(data); self.i = 0; self.chunk = chunk; self.sent = bytearray()
    async def send(self, b): self.sent.extend(b)
    async def recv_into(self, buf, t):
        if self.i >= len(self.data):
            await asyncio.sleep_ms(2); return 0
        n = min(self.chunk, len(buf), len(self.data) - self.i)
        buf[0:n] = self.data[self.i:self.i + n]; self.i += n
        return n
    def close(self): pass
def pub(topic, payload, pid=None):
    body = bytes([len(topic) >> 8, len(topic) & 255]) + topic
    if pid is not None:
        body += bytes([pid >> 8, pid & 255])
    body += payload
    n = len(body); out = bytearray([0x32 if pid is not None else 0x30])
    while True:
        b = n & 127; n >>= 7
        out.append(b | 128 if n else b)
        if not n: break
    return bytes(out) + body
"""


def interval_bin_size(mp=True):
    return len(_encode("interval", SAMPLE_INTERVAL, "bin", mp))


def interval_bin_size_usual(mp=True):
    return len(_encode("interval", SAMPLE_INTERVAL_USUAL, "bin", mp))


def interval_json_size(mp=True):
    return len(_encode("interval", SAMPLE_INTERVAL, "json", mp))


def interval_wire_size(meter_id="lipari-0001", fmt="bin", mp=True, rec=None):
    return publish_size("lipari/v1/%s/interval" % meter_id,
                        len(_encode("interval", rec or SAMPLE_INTERVAL, fmt, mp)))


if __name__ == "__main__":
    print(json.dumps({"interval_bin": interval_bin_size(), "interval_wire": interval_wire_size(),
                      "interval_json": interval_json_size()}))
