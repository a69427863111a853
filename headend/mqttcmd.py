"""`lipari cmd`: send a command to a meter and print its reply.

    lipari cmd m1 ping
    lipari cmd m1 get what=readings
    lipari cmd m1 set rt_s=30 'transport=["nbiot","wifi"]'
    lipari cmd m1 preset ai_wh=123456          # signed with var/keys/m1.key
    lipari cmd m1 time t=now

Arguments are key=value; a value is read as JSON when it parses (numbers, true, lists),
else as a string. Requests are signed (HMAC-SHA256, docs/protocol.md "Authorisation")
whenever a key file exists for the meter; commands on counters, calibration, tariff,
clock and reboot need it.
"""
import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import uuid

import paho.mqtt.client as paho

PREFIX = "lipari/v1"


class CmdError(Exception):
    """The command could not be sent or got no reply; the message says what to do."""


def sign(key, rid, ctr, body):
    """Same as firmware comm.commands.sign: hex HMAC-SHA256 over id, counter and body."""
    return hmac.new(key, ("%s\n%d\n%s" % (rid, ctr, body)).encode(), hashlib.sha256).hexdigest()


def load_key(meter_id, keys_dir="var/keys"):
    p = os.path.join(keys_dir, "%s.key" % meter_id)
    try:
        with open(p) as f:
            return bytes.fromhex(f.read().strip())
    except FileNotFoundError:
        return None
    except ValueError:
        raise CmdError("%s does not hold a hex key (conf/mosquitto/add-meter.sh writes one)" % p)


def build_request(cmd, args, key=None, ctr=None, rid=None, exp_s=None):
    """-> (id, payload bytes). Signed when key is given (ctr: must increase per meter;
    default: milliseconds since the epoch)."""
    rid = rid or uuid.uuid4().hex[:16]
    inner = {"cmd": cmd, "args": args or {}}
    if exp_s:
        inner["exp"] = int(time.time()) + int(exp_s)
    if key is None:   # "id" first: a meter that must discard a too-large request finds it
        return rid, json.dumps(dict({"id": rid}, **inner)).encode()
    ctr = ctr if ctr is not None else time.time_ns() // 1000000
    body = json.dumps(inner)
    return rid, json.dumps({"id": rid, "ctr": ctr, "body": body,
                            "mac": sign(key, rid, ctr, body)}).encode()


def send_command(meter_id, cmd, args=None, host="127.0.0.1", port=1883, user=None,
                 password=None, key=None, ctr=None, timeout_s=30, tls_ca=None, exp_s=None):
    """Publish a command to lipari/v1/<meter>/cmd and wait for the reply with the same id
    on .../resp. Returns the reply dict ({"id", "ok", "result"} or {"ok": False, "error",
    "msg"}). Raises CmdError when there is no reply within timeout_s."""
    rid, payload = build_request(cmd, args, key, ctr, exp_s=exp_s)
    got = {}
    done = threading.Event()
    subscribed = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2,
                    client_id="lipari-cmd-%s" % uuid.uuid4().hex[:8], clean_session=True)
    if user:
        c.username_pw_set(user, password)
    if tls_ca:
        c.tls_set(ca_certs=tls_ca)

    def on_connect(cl, ud, flags, rc, props=None):
        if rc.is_failure:
            got["error"] = "broker refused: %s (check --user/--password)" % rc
            done.set()
            return
        cl.subscribe("%s/%s/resp" % (PREFIX, meter_id), 1)

    def on_subscribe(cl, ud, mid, rcs, props=None):
        subscribed.set()

    def on_message(cl, ud, msg):
        try:
            rep = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(rep, dict) and rep.get("id") == rid:
            got["reply"] = rep
            done.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    try:
        c.connect(host, port, 30)
    except OSError as e:
        raise CmdError("cannot reach the broker at %s:%s: %s" % (host, port, e))
    c.loop_start()
    try:
        if not subscribed.wait(10):
            raise CmdError(got.get("error") or "no SUBACK from the broker within 10 s")
        c.publish("%s/%s/cmd" % (PREFIX, meter_id), payload, qos=1).wait_for_publish(10)
        if not done.wait(timeout_s):
            raise CmdError("no reply from %s within %s s: is the meter online (lipari web / "
                           "status topic)? The command stays queued in the broker for the "
                           "meter and runs when it reconnects%s." %
                           (meter_id, timeout_s, "" if exp_s else " (use --expire to limit that)"))
        if "error" in got:
            raise CmdError(got["error"])
        return got["reply"]
    finally:
        c.disconnect()
        c.loop_stop()


def _value(s):
    if s == "now":
        return int(time.time())
    try:
        return json.loads(s)
    except ValueError:
        return s


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari cmd", description=__doc__.splitlines()[0],
                                epilog="commands: ping, get, set, calibrate, reset, preset, "
                                "time, reboot (docs/protocol.md)")
    p.add_argument("meter")
    p.add_argument("cmd")
    p.add_argument("args", nargs="*", help="key=value")
    p.add_argument("--host", default=os.environ.get("LIPARI_MQTT_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("LIPARI_MQTT_PORT", 1883)))
    p.add_argument("--user", default=os.environ.get("LIPARI_MQTT_USER"))
    p.add_argument("--password", default=os.environ.get("LIPARI_MQTT_PASSWORD"))
    p.add_argument("--keys", default=os.environ.get("LIPARI_KEYS", "var/keys"),
                   help="directory with <meter>.key files")
    p.add_argument("--db", default=None, help="keep the command counter in this database "
                   "(default: the clock in milliseconds)")
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--expire", type=int, default=None,
                   help="the meter refuses the command after this many seconds")
    p.add_argument("--tls-ca", default=None)
    a = p.parse_args(argv)
    args = {}
    for kv in a.args:
        if "=" not in kv:
            print("lipari cmd: argument %r is not key=value" % kv, file=sys.stderr)
            return 2
        k, v = kv.split("=", 1)
        args[k] = _value(v)
    try:
        key = load_key(a.meter, a.keys)
        ctr = None
        if key is not None and a.db:
            from headend.ingest import _open_store
            st = _open_store(a.db)
            ctr = st.next_cmd_counter(a.meter, time.time_ns() // 1000000)
            st.close()
        rep = send_command(a.meter, a.cmd, args, a.host, a.port, a.user, a.password, key,
                           ctr, a.timeout, a.tls_ca, a.expire)
    except CmdError as e:
        print("lipari cmd: %s" % e, file=sys.stderr)
        return 1
    print(json.dumps(rep, indent=2))
    return 0 if rep.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
