"""A real Mosquitto on 127.0.0.1 (free port) running the repo's conf/mosquitto files.

    from conftest_broker import mosquitto       # pytest fixture
    def test_x(mosquitto):
        mosquitto.port; mosquitto.users["m1"]  # password
        mosquitto.restart()                    # SIGTERM (saves persistence), start again

Only listener, file paths and logging are replaced; every other setting is the shipped one.
"""
import os
import shutil
import socket
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf", "mosquitto")
USERS = {"headend": "headend-pw", "homeassistant": "ha-pw", "m1": "m1-pw", "m2": "m2-pw",
         "m3": "m3-pw"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def make_certs(d):
    """A CA and a broker certificate for 127.0.0.1 / localhost, made by the shipped
    conf/mosquitto/make-certs.sh, plus an unrelated CA (other.crt). -> CA path."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    script = os.path.join(CONF, "make-certs.sh")
    for args in (("ca", d), ("server", d, "127.0.0.1", "localhost")):
        subprocess.run([script] + list(args), check=True, capture_output=True)
    # a second, unrelated CA: a meter trusting it must refuse the broker
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "other.key", "-out",
                    "other.crt", "-days", "2", "-subj", "/CN=other"],
                   check=True, capture_output=True, cwd=d)
    return os.path.join(d, "ca.crt")


class Mosquitto:
    def __init__(self, workdir, users=None, port=None, tls=False):
        if not shutil.which("mosquitto"):
            pytest.skip("mosquitto is not installed (apt install mosquitto)")
        self.dir = str(workdir)
        self.users = dict(USERS if users is None else users)
        self.port = port or free_port()
        self.proc = None
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.passwd = os.path.join(self.dir, "passwd")
        open(self.passwd, "w").close()
        for u, pw in self.users.items():
            subprocess.run(["mosquitto_passwd", "-b", self.passwd, u, pw], check=True,
                           capture_output=True)
        shutil.copy(os.path.join(CONF, "acl"), os.path.join(self.dir, "acl"))
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        self.log = os.path.join(self.dir, "mosquitto.log")
        # The shipped file has a plain listener and a TLS listener (8883): both run, on free
        # ports, the TLS one with certificates made by make-certs.sh. tls=False skips the
        # certificates and the TLS listener (for tests that do not need them).
        self.tls_port = free_port() if tls else None
        self.ca = make_certs(self.dir) if tls else None
        tls_files = {"cafile": "ca.crt", "certfile": "server.crt", "keyfile": "server.key"}
        out = []
        listeners = 0
        in_tls = False
        for line in open(os.path.join(CONF, "mosquitto.conf")):
            key = line.split(" ", 1)[0].strip()
            if key == "listener":
                listeners += 1
                in_tls = listeners == 2
                if in_tls and not tls:
                    continue
                line = "listener %d 127.0.0.1\n" % (self.tls_port if in_tls else self.port)
            elif key in tls_files or key in ("tls_version", "require_certificate"):
                if not tls:
                    continue
                if key in tls_files:
                    line = "%s %s\n" % (key, os.path.join(self.dir, tls_files[key]))
            elif key == "password_file":
                line = "password_file %s\n" % self.passwd
            elif key == "acl_file":
                line = "acl_file %s\n" % os.path.join(self.dir, "acl")
            elif key == "persistence_location":
                line = "persistence_location %s/\n" % os.path.join(self.dir, "data")
            out.append(line)
        if tls and listeners != 2:
            raise RuntimeError("conf/mosquitto/mosquitto.conf has no TLS listener")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # mosquitto started as root drops to user "mosquitto", who cannot read tmp files
            out.append("user root\n")
        with open(self.conf, "w") as f:
            f.writelines(out)

    def start(self, timeout_s=5):
        self.proc = subprocess.Popen(["mosquitto", "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "a"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited: " + open(self.log).read()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen on %d within %s s" % (self.port, timeout_s))

    def stop(self, kill=False):
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s=0.0):
        self.stop()
        time.sleep(down_s)
        return self.start()


@pytest.fixture
def mosquitto(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()
