"""What `lipari loadtest` starts around the simulated fleet: Mosquitto with the repo's
configuration (conf/mosquitto/) and one password per meter, a throwaway PostgreSQL, the
ingest workers (`lipari headend` processes), and the CPU / memory sampling of each.

Everything listens on 127.0.0.1 only, on free ports, inside the run's directory.
"""
import base64
import glob
import hashlib
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

from headend import ROOT

CONF = os.path.join(ROOT, "conf", "mosquitto")


class InfraError(Exception):
    """A part of the test bed did not start; the message says which and why."""


def raise_fd_limit(want):
    """Raise this process's open-file limit towards `want` (soft up to the hard limit;
    the hard limit too when allowed). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    return soft


def _max_fds():
    # for child processes (preexec_fn): as many files as the hard limit allows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def passwd_line(user, password, rng=os.urandom):
    """One line of a Mosquitto 2.0 password file ($7$: PBKDF2-SHA512, 101 rounds), as
    mosquitto_passwd writes it; 10,000 meters are written in a second instead of 10,000
    mosquitto_passwd runs."""
    salt = rng(12)
    h = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return "%s:$7$101$%s$%s\n" % (user, base64.b64encode(salt).decode(),
                                  base64.b64encode(h).decode())


class Broker:
    """Mosquitto on the repo's conf/mosquitto files (only the listener, paths, logging and
    the connection limit replaced): passwords, ACL, persistence, queue limits as shipped."""

    def __init__(self, workdir, users, port=None):
        if not shutil.which("mosquitto"):
            raise InfraError("mosquitto is not installed (apt-get install mosquitto; make "
                             "setup does it as root)")
        self.dir = os.path.join(workdir, "broker")
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        self.port = port or free_port()
        self.passwd = os.path.join(self.dir, "passwd")
        with open(self.passwd, "w") as f:
            for u, pw in users.items():
                f.write(passwd_line(u, pw))
        os.chmod(self.passwd, 0o600)
        shutil.copy(os.path.join(CONF, "acl"), os.path.join(self.dir, "acl"))
        self.log = os.path.join(self.dir, "mosquitto.log")
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        self._write_conf()
        self.started = False
        self.proc = None

    def _write_conf(self):
        # The plain listener only: the shipped TLS listener (8883) and its certificate
        # settings are left out, the simulated meters connect without TLS (docs/scaling.md
        # says what TLS would add)
        out = []
        listeners = 0
        for line in open(os.path.join(CONF, "mosquitto.conf")):
            key = line.split(" ", 1)[0].strip()
            if key in ("cafile", "certfile", "keyfile", "tls_version", "require_certificate"):
                continue
            if key == "listener":
                listeners += 1
                if listeners > 1:
                    continue
                line = "listener %d 127.0.0.1\n" % self.port
            elif key == "password_file":
                line = "password_file %s\n" % self.passwd
            elif key == "acl_file":
                line = "acl_file %s\n" % os.path.join(self.dir, "acl")
            elif key == "persistence_location":
                line = "persistence_location %s/\n" % os.path.join(self.dir, "data")
            elif key == "connection_messages":
                line = "connection_messages false\n"   # 10,000 lines per reconnect storm
            out.append(line)
        # no connection limit (the shipped file sets none either: -1 is the default);
        # the file limit is raised for the process (preexec_fn), the listen backlog is
        # the kernel's somaxconn
        out.append("max_connections -1\n")
        if os.geteuid() == 0:
            out.append("user root\n")
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.writelines(out)

    def start(self, timeout_s=20):
        for attempt in range(3):
            try:
                return self._start(timeout_s)
            except InfraError as e:
                # the free port was taken meanwhile (other tests on this machine): another,
                # unless the broker ran already (a restart keeps its port for the meters)
                if "Address already in use" not in str(e) or self.started or attempt == 2:
                    raise
                self.port = free_port()
                self._write_conf()

    def _start(self, timeout_s):
        self.proc = subprocess.Popen(["mosquitto", "-c", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "a"), preexec_fn=_max_fds,
                                     start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise InfraError("mosquitto exited: %s" % open(self.log).read()[-1500:])
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                time.sleep(0.05)
            else:
                self.started = True
                return self
        raise InfraError("mosquitto did not listen on %d within %s s" % (self.port, timeout_s))

    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self, kill=False):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _pg_bin(name):
    found = shutil.which(name) or sorted(glob.glob("/usr/lib/postgresql/*/bin/" + name))
    return found if isinstance(found, str) else (found[-1] if found else None)


class Postgres:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl in the run directory, as user
    postgres when run as root). fsync stays on: a commit is on disk, as in production."""

    def __init__(self, workdir):
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise InfraError("PostgreSQL server is not installed (apt-get install postgresql)")
        # its own temporary directory: the postgres user must reach it (the run directory
        # may sit under a private parent)
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="lipari-pg-")
        self.demote = None
        if os.geteuid() == 0:                   # initdb refuses to run as root
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise InfraError("running as root and there is no 'postgres' user")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

            def demote():
                os.setgid(pw.pw_gid)
                os.setuid(pw.pw_uid)
            self.demote = demote
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.url = "postgresql://postgres@127.0.0.1:%d/lipari" % self.port

    def _run(self, argv):
        r = subprocess.run(argv, preexec_fn=self.demote, capture_output=True, text=True,
                           timeout=120)
        if r.returncode:
            raise InfraError("%s failed: %s" % (os.path.basename(argv[0]),
                                                (r.stderr or r.stdout)[-800:]))

    def start(self):
        import psycopg
        self._run([self.initdb, "-D", self.data, "-U", "postgres", "--auth=trust", "-E",
                   "UTF8", "--no-sync"])
        self._run([self.pg_ctl, "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w",
                   "-t", "60", "-o", "-c listen_addresses=127.0.0.1 -p %d -k %s "
                   "-c shared_buffers=256MB -c max_wal_size=2GB" % (self.port, self.dir),
                   "start"])
        with psycopg.connect("postgresql://postgres@127.0.0.1:%d/postgres" % self.port,
                             autocommit=True) as c:
            c.execute("CREATE DATABASE lipari")
        return self

    def pids(self):
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as f:
                main = int(f.readline())
        except (OSError, ValueError):
            return []
        import psutil
        try:
            p = psutil.Process(main)
            return [main] + [c.pid for c in p.children(recursive=True)]
        except psutil.Error:
            return []

    def stop(self):
        subprocess.run([self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop"],
                       preexec_fn=self.demote, capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


class Workers:
    """`lipari headend` worker processes on the shared subscription: worker 1 is the
    anchor (docs/protocol.md, "Broker") unless anchor=False, the others --no-anchor."""

    def __init__(self, workdir, n, port, db, password, anchor=True):
        self.dir = os.path.join(workdir, "ingest")
        os.makedirs(self.dir, exist_ok=True)
        self.n, self.port, self.db, self.password = n, port, db, password
        self.anchor = anchor
        self.procs = {}
        self.stopping = set()       # being stopped on purpose (an ingest outage): not a death

    def log_path(self, k):
        return os.path.join(self.dir, "commits-%d.log" % k)

    def start(self, which=None):
        for k in (which or range(1, self.n + 1)):
            argv = [sys.executable, "-m", "headend.ingest", "--port", str(self.port),
                    "--user", "headend", "--db", self.db, "--client-id", "lt-ingest-%d" % k,
                    "--commit-log", self.log_path(k)]
            if k > 1 or not self.anchor:
                argv.append("--no-anchor")
            err = open(os.path.join(self.dir, "worker-%d.err" % k), "a")
            self.procs[k] = subprocess.Popen(
                argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                env=dict(os.environ, LIPARI_MQTT_PASSWORD=self.password))
        return self

    def check(self):
        """Raise when a worker died (its last error lines say why)."""
        for k, p in list(self.procs.items()):
            if p is not None and k not in self.stopping and p.poll() is not None:
                err = open(os.path.join(self.dir, "worker-%d.err" % k)).read()[-800:]
                raise InfraError("ingest worker %d exited with %s: %s" % (k, p.returncode, err))

    def pids(self):
        return [p.pid for p in self.procs.values() if p is not None and p.poll() is None]

    def stop(self, which=None):
        for k in list(which or self.procs):
            p = self.procs.get(k)
            if p is None:
                continue
            # stop() runs in an executor thread while the sampler calls check(): a worker
            # that exits on our SIGTERM before its slot is cleared is not a dead worker
            self.stopping.add(k)
            try:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
                self.procs[k] = None
            finally:
                self.stopping.discard(k)


class Sampler:
    """CPU (% of one core) and resident memory of named process groups, every call."""

    def __init__(self):
        import psutil
        self.psutil = psutil
        self._procs = {}

    def sample(self, groups):
        """groups: {name: [pid, ...]} -> {name: {"cpu_pct", "rss_mb"}}."""
        out = {}
        for name, pids in groups.items():
            cpu = rss = 0.0
            for pid in pids:
                p = self._procs.get(pid)
                try:
                    if p is None:
                        p = self._procs[pid] = self.psutil.Process(pid)
                        p.cpu_percent(None)
                        continue
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                except self.psutil.Error:
                    self._procs.pop(pid, None)
            out[name] = {"cpu_pct": round(cpu, 1), "rss_mb": round(rss / 1e6, 1)}
        return out
