"""OTA end to end: a real Mosquitto, the head-end ingest into SQLite, virtual meters started
by the bootstrap from their own directory (like a board's flash), and `lipari ota`.

    f = OtaFleet(tmp_path, ["m1", "m2"])          # broker + ingest + key + base firmware
    m = f.meter("m1")                              # deploy 0.1.0 into tmp/m1, start it
    rel = f.release("0.2.0")                       # lipari ota release (cached per version)
    r = f.push(rel, "m1")                          # lipari ota push -> (rc, json summary)
    m.wait_for(lambda: m.fw() == "0.2.0")

A meter process is supervised like a board: when it exits (reboot command, OTA reset, a
crash) it is started again, on the same directory and flash image (--state), so energy
and the switch record survive as on a real meter.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from conftest_broker import Mosquitto  # noqa: E402
from headend import ota, meter_net  # noqa: E402

BIN = os.path.join(ROOT, ".venv", "bin")
MP = os.path.join(BIN, "micropython")
START = 1767225600                 # meter clock start: 2026-01-01 00:00 UTC
FAST_MQTT = {"keepalive_s": 4, "backoff_min_ms": 200, "backoff_max_ms": 1000,
             "ack_timeout_ms": 3000, "connect_timeout_ms": 5000}
FAST_SESSION = {"backlog_per_s": 50, "ack_timeout_ms": 3000, "rt_s": 5}
FAST_OTA = {"chunk_wait_ms": 1500, "gap_ms": 2, "stall_s": 60}
SPEED = 20                         # meter seconds per real second
TRIAL_S = 120                      # health deadline in meter seconds (6 s real)


def lipari(*args, timeout=240, env=None):
    r = subprocess.run([os.path.join(BIN, "lipari"), *args], capture_output=True, text=True,
                       timeout=timeout, env=env)
    return r


def install(directory, slot_files, board="unix_sim_3ph", pub=None, config=None):
    """What `lipari deploy` puts on a board, into a host directory: the bootstrap, slot a,
    the board, the public key, config.json."""
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    a = os.path.join(directory, "fw", "a")
    if os.path.isfile(slot_files):          # a ROMFS image: slot a's image, no directory
        os.makedirs(os.path.dirname(a))
        shutil.copy(slot_files, a + ".rom")
    else:
        shutil.copytree(slot_files, a)
    shutil.copy(os.path.join(ROOT, "firmware", "boot.py"), os.path.join(directory, "boot.py"))
    shutil.copy(os.path.join(ROOT, "boards", board + ".py"), os.path.join(directory, "board.py"))
    if pub:
        shutil.copy(pub, os.path.join(directory, "ota.pub"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config or {}, f)


class OtaMeter:
    """One supervised virtual meter (see the top)."""

    def __init__(self, directory, argv, heap="1M"):
        self.dir = directory
        self.argv = [MP, "-X", "heapsize=%s" % heap, "boot.py"] + argv
        self.t0 = time.monotonic()
        self.env = dict(os.environ, MICROPYPATH=":".join([os.path.join(ROOT, "boards"), ROOT,
                                                         ".frozen"]))
        self.log = open(os.path.join(directory, "console.log"), "a")
        self.records = []               # every JSON line, with "boot" = start number
        self.exits = []                 # exit codes
        self.boots = 0
        self.p = None
        self._stop = False
        self._lock = threading.Lock()
        self._th = threading.Thread(target=self._supervise, daemon=True)
        self._th.start()

    def _supervise(self):
        while not self._stop:
            with self._lock:
                if self._stop:
                    return
                self.boots += 1
                boot = self.boots
                # the meter's clock goes on across restarts, as a board's RTC does
                start = START + int((time.monotonic() - self.t0) * SPEED)
                self.p = subprocess.Popen(self.argv + ["--start", str(start)], cwd=self.dir,
                                          env=self.env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for line in self.p.stdout:
                self.log.write(line)
                self.log.flush()
                s = line.strip()
                if s.startswith("{"):
                    try:
                        d = json.loads(s)
                    except ValueError:
                        continue
                    d["boot"] = boot
                    d["ht"] = time.time()          # host time of the line
                    self.records.append(d)
            self.exits.append(self.p.wait())
            time.sleep(0.2)             # a board takes a moment to come back

    def kill(self):
        """Power cut: SIGKILL, no checkpoint; the supervisor starts it again."""
        with self._lock:
            if self.p and self.p.poll() is None:
                self.p.kill()

    def stop(self):
        self._stop = True
        self.kill()
        self._th.join(10)
        self.log.close()

    def intervals(self):
        return [r for r in self.records if r.get("type") == "interval"]

    def errors(self):
        return [r for r in self.records if r.get("type") == "error"]

    def record(self):
        """The switch record as the bootstrap reads it (CPython, same file)."""
        sys.path.insert(0, os.path.join(ROOT, "firmware"))
        try:
            import boot
        finally:
            sys.path.pop(0)
        cwd = os.getcwd()
        os.chdir(self.dir)
        try:
            return boot.read_record()
        finally:
            os.chdir(cwd)

    def running_version(self):
        r = self.record() or {"slot": 0}
        return read_slot_version(os.path.join(self.dir, "fw", "ab"[r["slot"]]))


def read_slot_version(slot_dir):
    """VERSION of the firmware in a slot, read by micropython from its version.mpy (the
    slot's directory, or else its ROMFS image <slot>.rom mounted with vfs.VfsRom)."""
    if not os.path.exists(os.path.join(slot_dir, "version.mpy")) and \
            os.path.exists(slot_dir + ".rom"):
        code = ("import sys, vfs; vfs.mount(vfs.VfsRom(open(%r, 'rb').read()), '/rom'); "
                "sys.path.insert(0, '/rom'); import version; print(version.__file__, "
                "version.VERSION)" % (slot_dir + ".rom"))
    else:
        code = ("import sys; sys.path.insert(0, %r); import version; print(version.__file__, "
                "version.VERSION)" % slot_dir)
    r = subprocess.run([MP, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, MICROPYPATH=".frozen"), timeout=30)
    return r.stdout.split()[-1] if r.stdout.split() else ""


def wait_for(pred, timeout_s, what="condition", step_s=0.2):
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        v = pred()
        if v:
            return v
        time.sleep(step_s)
    raise AssertionError("timed out after %s s waiting for %s" % (timeout_s, what))


class OtaFleet:
    def __init__(self, workdir, meter_ids):
        from headend.store import Store
        from headend.ingest import Ingest
        self.dir = str(workdir)
        users = {"headend": "headend-pw"}
        users.update({m: m + "-pw" for m in meter_ids})
        self.users = users
        self.broker = Mosquitto(os.path.join(self.dir, "broker"), users=users).start()
        self.db = os.path.join(self.dir, "lipari.db")
        self.store = Store("sqlite:///" + self.db)
        self.ingest = Ingest(self.store, port=self.broker.port, user="headend",
                             password="headend-pw", client_id="ota-ingest", anchor=True,
                             reconnect_s=(0.2, 1))
        self.ingest.start()
        self.keys = os.path.join(self.dir, "keys")
        ota.keygen(self.keys)
        self.key = os.path.join(self.keys, "ota.key")
        self.pub = os.path.join(self.keys, "ota.pub")
        self.base = os.path.join(self.dir, "base")
        ota.compile_slot(os.path.join(ROOT, "firmware"), self.base)
        self.releases = os.path.join(self.dir, "releases")
        self.meters = {}
        # the dashboard's server on the same database (what an operator looks at)
        from headend.web import serve
        from headend.web.commands import Commander
        os.environ["LIPARI_OTA_RELEASES"] = self.releases
        os.environ["LIPARI_OTA_PUB"] = self.pub
        self.web = serve(self.store, port=0, poll_s=0.2, commander=Commander(
            "127.0.0.1:%d" % self.broker.port, self.store, user="headend", password="headend-pw"))
        self.web.state.users.add("root", "admin")
        self.token = self.web.state.users.new_token("root", "ota tests")[1]

    def romfs_base(self):
        """The base firmware as a ROMFS image (what `lipari deploy` puts in the ROMFS
        partition of a board that has one), built once."""
        p = os.path.join(self.dir, "base.romfs")
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(ota.build_romfs("unix_sim_3ph", ota.FIRMWARE,
                                        ota.firmware_version(), self.dir))
        return p

    def meter(self, mid, transport="wifi", profile="household", extra=(), ota_cfg=None,
              romfs=False):
        """romfs: deployed as a ROMFS image in slot a (fw/a.rom), not .mpy files."""
        d = os.path.join(self.dir, mid)
        install(d, self.romfs_base() if romfs else self.base, pub=self.pub,
                config={"ota": dict(FAST_OTA, **(ota_cfg or {}))})
        creds = meter_net.write_creds(os.path.join(d, "creds.json"), mid, self.users[mid],
                                      os.urandom(32), mqtt=FAST_MQTT, session=FAST_SESSION)
        argv = ["--board", "board", "--profile", profile, "--speed", str(SPEED),
                "--interval", "60", "--id", mid, "--creds", creds, "--broker",
                "127.0.0.1:%d" % self.broker.port, "--transport", transport, "--state",
                os.path.join(d, "flash.img"), "--print", "json"] + list(extra)
        m = self.meters[mid] = OtaMeter(d, argv)
        return m

    def release(self, version, src=None, key=None, boards=("unix_sim_3ph",), **kw):
        """lipari ota release (the CLI), into releases/<version>."""
        args = ["ota", "release", "--key", key or self.key, "--version", version,
                "--out", self.releases, "--trial-s", str(kw.pop("trial_s", TRIAL_S))]
        for b in boards:
            args += ["--board", b]
        if src:
            args += ["--src", src]
        for k, v in kw.items():
            args += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
        r = lipari(*args)
        assert r.returncode == 0, r.stdout + r.stderr
        return os.path.join(self.releases, version)

    def push_args(self, rel, meters, *extra):
        args = ["ota", "push", rel, "--db", "sqlite:///" + self.db, "--port",
                str(self.broker.port), "--user", "headend", "--password", "headend-pw",
                "--pub", self.pub, "--stage-timeout", "120"]
        for m in meters if isinstance(meters, (list, tuple)) else [meters]:
            args += ["--meter", m]
        return args + list(extra)

    def push(self, rel, meters, *extra, timeout=240):
        """lipari ota push; returns (exit code, its JSON summary line or None, output)."""
        r = lipari(*self.push_args(rel, meters, *extra), timeout=timeout)
        out = None
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                out = json.loads(line)
        return r.returncode, out, r.stdout + r.stderr

    def push_bg(self, rel, meters, *extra):
        return subprocess.Popen([os.path.join(BIN, "lipari")] + self.push_args(rel, meters, *extra),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def api(self, path, body=None, token=None):
        """The web API as the dashboard uses it -> (HTTP status, JSON)."""
        import urllib.request
        import urllib.error
        h = {"Authorization": "Bearer " + (token or self.token)}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        req = urllib.request.Request(self.web.url + "/api/v1" + path, data=data, headers=h,
                                     method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def ota_state(self, mid):
        """The meter's OTA state as the dashboard's API shows it."""
        st, body = self.api("/meters/%s/ota" % mid)
        if st == 404:
            return {"state": None, "target": None, "log": []}
        assert st == 200, body
        return body

    def close(self):
        self.web.stop()
        for m in self.meters.values():
            m.stop()
        self.ingest.stop()
        self.store.close()
        self.broker.stop()


def patched_tree(workdir, name, edits):
    """A copy of firmware/ with text edits {relative path: (old, new)} -> its path."""
    d = os.path.join(str(workdir), "src-" + name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    shutil.copytree(os.path.join(ROOT, "firmware"), d)
    for rel, (old, new) in edits.items():
        p = os.path.join(d, rel)
        text = open(p).read()
        assert old in text, (rel, old)
        with open(p, "w") as f:
            f.write(text.replace(old, new, 1))
    return d
