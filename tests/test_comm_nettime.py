"""comm.transport.NetTime: the modem's network time, kept with the MCU's wrapping ticks
(run on micropython with a 30-bit port's ticks, which wrap at 2**30 ms)."""
import json

from comm_harness import run_mp


def test_network_time_stays_right_across_days_and_the_ticks_wrap_and_says_when_lost():
    out = run_mp(r"""
import json
import comm.transport as tr
# a 30-bit port's ticks (every MCU port; the 64-bit unix port wraps at 2**62 instead)
def diff(a, b):
    d = (a - b) & 0x3FFFFFFF
    return d - 0x40000000 if d & 0x20000000 else d
T = [(1 << 30) - 5000]                       # 5 s before the ticks wrap
tr.ticks_ms = lambda: T[0] & 0x3FFFFFFF
tr.ticks_diff = diff
tr.ticks_add = lambda a, b: (a + b) & 0x3FFFFFFF
DAY = 86400000
nt = tr.NetTime()
out = {'unset': nt.get(), 'bad_set': nt.set(315532800)}   # 1980: not a network time
nt.set(1767225600)
reads = []
for step in (1500, 3500, DAY, 5 * DAY + 777, 6 * DAY):   # each under 6.2 days
    T[0] += step
    reads.append(nt.get())
out['reads'] = reads
T[0] += 7 * DAY                              # unread for more than half the period
out['lost'] = nt.get()
out['still_lost'] = nt.get()
nt.set(1800000000)
out['set_again'] = nt.get()
print(json.dumps(out))
""")
    r = json.loads(out.strip().splitlines()[-1])
    assert r["unset"] is None and r["bad_set"] is False, r
    t0, ms = 1767225600, 0
    want = []
    for step in (1500, 3500, 86400000, 5 * 86400000 + 777, 6 * 86400000):
        ms += step
        want.append(t0 + ms // 1000)          # whole seconds, no drift from re-anchoring
    assert r["reads"] == want, r
    assert r["lost"] is None and r["still_lost"] is None, r
    assert r["set_again"] == 1800000000, r
