# The NB-IoT modem's bring-up (sync, SIM, attach, PWRKEY power cycle) and its TLS set-up
# (the CA and client certificate uploaded to the modem, the SSL context configured): code
# that runs when the link comes up (at boot, and again after a link loss) or a TLS
# connection is opened, and the AT channel's resynchronisation after a command timed out:
# not while a running meter sends. NbiotTransport.up() and
# .connect() (AtPort after a timeout) import this module for the call and drop it from sys.modules at once
# (comm/nbiot.py _load): the running call's functions keep their globals until it
# returns, then its function objects and globals are freed (docs/ram.md, decision 0020).
try:
    from micropython import const
except ImportError:
    const = lambda x: x  # noqa: E731

from util import deadline_ms as _deadline
from comm.transport import sleep_ms, remaining_ms
from comm.nbiot import ModemError, ModemTimeout

_CTX = const(1)               # PDP context id (comm/nbiot.py _CTX)

# tls dict keys over NB-IoT: files on the meter uploaded to the modem, or files already
# in the modem's file system (provisioned at the factory), referenced by name.
_TLS_KEYS = ("ca", "cert", "key", "modem_ca", "modem_cert", "modem_key",
             "server_hostname", "insecure")
_TLS_FILES = (("ca", "cacert", "UFS:lp_ca.pem"), ("cert", "clientcert", "UFS:lp_crt.pem"),
              ("key", "clientkey", "UFS:lp_key.pem"))


def qf_checksum(data):
    """+QFUPL checksum: XOR of the data as big-endian 16-bit words, an odd last byte
    as the high byte (Quectel FILE AT Commands Manual, AT+QFUPL note 2)."""
    c = 0
    n = len(data)
    for i in range(0, n - 1, 2):
        c ^= (data[i] << 8) | data[i + 1]
    if n & 1:
        c ^= data[n - 1] << 8
    return c


async def resync(port, deadline):
    """Send ATI and drop every line until its "Revision:" line and final OK. The
    modem answers in order, so whatever an abandoned command still had to say comes
    before ATI's answer, which no other command of ours produces."""
    port.stats["resyncs"] += 1
    await port._write(b"ATI\r")
    seen = False
    while True:
        line = await port._readline(deadline)
        if line.startswith("Revision:"):
            seen = True
        elif line == "OK" and seen:
            port.stale = False
            return
        elif line and port._is_urc(line):
            port.stats["urcs"] += 1
            port.on_urc(line)


async def _sync(t, deadline):
    # Autobaud / wake: "AT" until OK, a bounded number of times.
    for _ in range(10):
        if remaining_ms(deadline) <= 0:
            break
        try:
            await t.port.cmd("AT", min(500, max(50, remaining_ms(deadline))))
            break
        except ModemTimeout:
            continue
        except ModemError:
            continue
    else:
        raise ModemTimeout("modem does not answer AT: check power, PWRKEY and UART wiring")
    if remaining_ms(deadline) <= 0:
        raise ModemTimeout("modem does not answer AT: check power, PWRKEY and UART wiring")
    await t.port.cmd("ATE0")
    await t.port.cmd("AT+CMEE=1")
    t.ready = True


async def _press(t):
    t.pwrkey.value(1)
    await sleep_ms(t.cfg["pwrkey_ms"])
    t.pwrkey.value(0)


async def _wait_rdy(t, deadline):
    t_end = _deadline(t.cfg["rdy_ms"])
    while not t._rdy:
        if remaining_ms(t_end) <= 0 or remaining_ms(deadline) <= 0:
            return False
        async with t.port.lock:
            t.port.pump()
        await sleep_ms(50)
    return True


async def _power_cycle(t, deadline):
    """A modem that stopped answering is power-cycled with PWRKEY (BG95 hardware
    design: a press turns a running module off, or an off one on). Without a STATUS
    line the driver cannot tell which happened: it waits for RDY, and when none
    comes (the module was on and is now off) it presses again. Non-blocking: asyncio
    sleeps only."""
    t.power_cycles += 1
    for _ in range(2):
        t._rdy = False
        await _press(t)
        if await _wait_rdy(t, deadline):
            t.port.timeouts = 0
            t.port.stale = False          # a fresh modem has nothing left to say
            t.ready = False
            t._files = {}
            t._ssl_applied = None
            return True
        if remaining_ms(deadline) <= 0:
            break
        await sleep_ms(2000)                 # off now: let it settle before pressing
    t.detail = "modem does not come back after PWRKEY: check its supply"
    return False


async def _sim(t):
    try:
        r = await t.port.cmd("AT+CPIN?", prefix="+CPIN:")
    except ModemError as e:
        raise ModemError("SIM not usable (%s)" % e, e.code)
    state = r[0][6:].strip() if r else ""
    if state == "READY":
        return
    if state == "SIM PIN":
        if not t.cfg["pin"]:
            raise ModemError("SIM asks for a PIN: set nbiot pin in the config", 11)
        await t.port.cmd('AT+CPIN="%s"' % t.cfg["pin"], 5000)
        return
    raise ModemError("SIM state %r: the SIM needs attention (PUK? insert SIM?)" % state)


async def _attach(t, deadline):
    q = t.cfg
    await t.port.cmd('AT+QICSGP=%d,1,"%s","%s","%s",%d' % (
        _CTX, q["apn"], q["user"], q["password"], q["auth"]))
    await t.port.cmd("AT+CEREG=1")
    if await t._reg_state() not in (1, 5):
        await t.port.cmd("AT+CGATT=1", max(100, min(q["attach_ms"], remaining_ms(deadline))))
    while await t._reg_state() not in (1, 5):
        if t.reg == 3:
            raise ModemError("network denied registration (+CEREG: 3): check the SIM's "
                             "NB-IoT subscription")
        if remaining_ms(deadline) <= q["reg_poll_ms"]:
            raise ModemTimeout("not registered to the network (+CEREG: %d) before the "
                               "deadline: check antenna and coverage" % t.reg)
        await sleep_ms(q["reg_poll_ms"])
    r = await t.port.cmd("AT+QIACT?", prefix="+QIACT:")
    for line in r:
        a = line[7:].split(",")
        if int(a[0]) == _CTX and int(a[1]) == 1:
            t.pdp = True
            t.ip = a[3].strip('"') if len(a) > 3 else None
    if not t.pdp:
        await t.port.cmd("AT+QIACT=%d" % _CTX,
                         max(100, min(q["act_ms"], remaining_ms(deadline))))
        t.pdp = True


async def up(t, deadline_ms):
    """Sync with the modem, unlock the SIM, set the APN, attach, activate the PDP
    context. deadline_ms is the budget. False (with health()["detail"]) on failure."""
    deadline = _deadline(deadline_ms)
    try:
        await t._close_pending()
        if not t.ready or t.port.timeouts >= t.cfg["max_timeouts"]:
            if t.port.timeouts >= t.cfg["max_timeouts"] and t.pwrkey is not None:
                await _power_cycle(t, deadline)
            await _sync(t, deadline)
            await _sim(t)
        await _attach(t, deadline)
        await t.check()
        t.detail = "attached" + (" ip %s" % t.ip if t.ip else "")
        return True
    except ModemError as e:
        t.detail = str(e)
        if isinstance(e, ModemTimeout):
            t.ready = t.ready and t.port.timeouts < t.cfg["max_timeouts"]
        return False


async def _upload(t, name, data):
    """Put data into the modem's file system as `name` (AT+QFDEL, AT+QFUPL), checking
    the size and checksum the modem reports. Skipped when this very content was
    uploaded since the modem last restarted."""
    cks = qf_checksum(data)
    if t._files.get(name) == (len(data), cks):
        return
    try:
        await t.port.cmd('AT+QFDEL="%s"' % name)
    except ModemError as e:
        if e.code != 405:          # 405: no such file, nothing to delete
            raise
    tmo_s = max(1, t.cfg["upload_ms"] // 1000)
    r = await t.port.cmd('AT+QFUPL="%s",%d,%d' % (name, len(data), tmo_s),
                         t.cfg["upload_ms"] + 1000, prefix="+QFUPL:", data=data)
    try:
        a = r[0][7:].split(",")
        got, got_cks = int(a[0]), int(a[1], 16)
    except (IndexError, ValueError):
        raise ModemError("modem did not confirm the upload of %s: %r" % (name, r))
    if got != len(data) or got_cks != cks:
        t._files.pop(name, None)
        raise ModemError("upload of %s to the modem corrupted (%d bytes, checksum %04x; "
                         "sent %d, %04x): check the UART" % (name, got, got_cks,
                                                             len(data), cks))
    t._files[name] = (len(data), cks)


async def ssl_setup(t, tls):
    """Configure the modem's SSL context from the tls dict: CA (and client
    certificate) files uploaded from the meter or named in the modem, server
    verification on (seclevel 1, 2 with a client certificate)."""
    for k in tls:
        if k not in _TLS_KEYS:
            raise ModemError("tls over NB-IoT: unknown key %r (known: %s)"
                             % (k, ", ".join(_TLS_KEYS)))
    q = t.cfg
    paths = {}
    for key, what, name in _TLS_FILES:
        if tls.get(key):
            try:
                with open(tls[key], "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ModemError("tls %s file %s cannot be read (%s)" % (key, tls[key], e))
            await _upload(t, name, data)
            paths[what] = name
        elif tls.get("modem_" + key):
            paths[what] = tls["modem_" + key]
    insecure = bool(tls.get("insecure"))
    if "cacert" not in paths and not insecure:
        raise ModemError("tls over NB-IoT needs a CA: set tls ca (a file on the meter, "
                         "uploaded to the modem) or modem_ca (a file in the modem)")
    if ("clientcert" in paths) != ("clientkey" in paths):
        raise ModemError("tls: a client certificate needs its key (cert and key)")
    level = 0 if insecure else (2 if "clientcert" in paths else 1)
    ctx = q["ssl_ctx"]
    cmds = ['"sslversion",%d,%d' % (ctx, q["ssl_version"]),
            '"ciphersuite",%d,0xFFFF' % ctx,
            '"seclevel",%d,%d' % (ctx, level),
            '"ignorelocaltime",%d,%d' % (ctx, 0 if q["tls_check_time"] else 1),
            '"negotiatetime",%d,%d' % (ctx, min(300, max(10, q["negotiate_s"])))]
    for what in ("cacert", "clientcert", "clientkey"):
        if what in paths:
            cmds.append('"%s",%d,"%s"' % (what, ctx, paths[what]))
    if cmds == t._ssl_applied:
        return
    for c in cmds:
        await t.port.cmd("AT+QSSLCFG=" + c)
    t._ssl_applied = cmds
