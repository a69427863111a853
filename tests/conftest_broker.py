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
    """A test CA and a server certificate for 127.0.0.1 / localhost (openssl). -> CA path."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, cwd=d)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=lipari-test-ca")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    # a second, unrelated CA: a meter trusting it must refuse the broker
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "other.key", "-out", "other.crt", "-days", "2", "-subj", "/CN=other")
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
        out = []
        for line in open(os.path.join(CONF, "mosquitto.conf")):
            key = line.split(" ", 1)[0].strip()
            if key == "listener":
                line = "listener %d 127.0.0.1\n" % self.port
            elif key == "password_file":
                line = "password_file %s\n" % self.passwd
            elif key == "acl_file":
                line = "acl_file %s\n" % os.path.join(self.dir, "acl")
            elif key == "persistence_location":
                line = "persistence_location %s/\n" % os.path.join(self.dir, "data")
            out.append(line)
        self.tls_port = None
        if tls:
            self.tls_port = free_port()
            self.ca = make_certs(self.dir)
            out.append("listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n"
                       "tls_version tlsv1.2\n" % (self.tls_port, self.ca,
                                                   os.path.join(self.dir, "server.crt"),
                                                   os.path.join(self.dir, "server.key")))
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
