"""`lipari ota`: signed firmware updates over the air (docs/ota.md, docs/operations.md).

    lipari ota keygen                               # var/ota/ota.key + ota.pub
    lipari ota release --board unix_sim_3ph [--version 0.2.0] [--kind romfs]
    lipari ota push 0.2.0 --meter m1 [--meter m2]   # or --fleet --stages 10,50,100
    lipari ota status [--meter m1] [--rollout 3]
"""
import argparse
import json
import os
import sys
import time

from headend import ota
from headend.ota import OtaError

ENV = os.environ.get


def _db(a):
    from headend.ingest import _open_store
    return _open_store(a.db)


def _broker_args(p):
    p.add_argument("--host", default=ENV("LIPARI_MQTT_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(ENV("LIPARI_MQTT_PORT", 1883)))
    p.add_argument("--user", default=ENV("LIPARI_MQTT_USER"))
    p.add_argument("--password", default=ENV("LIPARI_MQTT_PASSWORD"))


def cmd_keygen(a):
    kp, pp = ota.keygen(a.dir, a.force)
    print("signing key %s (keep it secret and backed up), public key %s (lipari deploy "
          "installs it on each meter)" % (kp, pp))
    return 0


def cmd_release(a):
    expires = a.expires
    if expires is None and a.expires_days is not None:
        expires = int(time.time() + a.expires_days * 86400)
    d = ota.build_release(a.key, a.board, src=a.src, version=a.version,
                          min_version=a.min_version, expires=expires, block=a.block,
                          trial_s=a.trial_s, out=a.out, downgrade=a.downgrade, kind=a.kind)
    r = json.load(open(os.path.join(d, "release.json")))
    print("release %s for %s: %s, image %d bytes, expires %s -> %s" % (
        r["version"], ", ".join(r["boards"]), "%d files" % r["files"] if r["kind"] == "mpy"
        else "ROMFS image of %d bytes" % r["body_size"], r["image_bytes"],
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(r["expires"])), d))
    return 0


def _release_dir(name, releases):
    if os.path.isdir(name):
        return os.path.abspath(name)
    d = os.path.join(releases, name)
    if os.path.isdir(d):
        return os.path.abspath(d)
    raise OtaError("no release %r (neither a directory nor %s); build it with `lipari ota "
                   "release`" % (name, d))


def _fleet(store, boards):
    with store._lock:
        rows = store.db.execute("SELECT id, board FROM meters ORDER BY id").fetchall()
    return [r[0] for r in rows if r[1] in boards]


def cmd_push(a):
    from headend.ota_server import OtaServer, push
    from headend import ota_store
    d = _release_dir(a.release, a.releases)
    rel = ota.Release(d)
    if not a.no_verify:
        probs = ota.check_release(d, ota.load_pub(a.pub))
        if probs:
            raise OtaError("release %s is not fit to push: %s (--no-verify pushes it anyway, "
                           "to test meters against a broken release)" % (d, "; ".join(probs)))
    stages = [float(s) for s in a.stages.split(",")] if a.stages else [100.0]
    store = _db(a)
    meters = []
    for m in a.meter or []:
        meters += [x for x in m.split(",") if x]
    if a.fleet:
        meters += [m for m in _fleet(store, rel.m.get("boards", [])) if m not in meters]
    if not meters:
        raise OtaError("no meters: name them with --meter, or --fleet for every meter of "
                       "the release's boards (%s) in %s" % (", ".join(rel.m.get("boards", [])), a.db))
    srv = OtaServer(store, a.host, a.port, a.user, a.password, http_base=a.http_base)
    http = None
    if a.http is not None:
        from headend.ota_http import serve
        http = serve(a.releases if os.path.isdir(a.releases) else os.path.dirname(d),
                     a.http_host, a.http)
        srv.http_base = srv.http_base or "http://%s:%d" % (a.http_host, http.server_port)
    srv.start()
    try:
        rid = push(store, srv, d, meters, stages, a.max_fail, a.stage_timeout,
                   by_user=a.by)
    finally:
        srv.stop()
        if http is not None:
            http.shutdown()
    r = ota_store.rollout(store, rid)
    ok = sum(1 for t in r["targets"] if t["outcome"] == "ok")
    print(json.dumps({"rollout": rid, "state": r["state"], "reason": r["reason"],
                      "ok": ok, "failed": len(r["targets"]) - ok,
                      "meters": {t["meter_id"]: [t["state"], t["reason"]] for t in r["targets"]},
                      "served": srv.stats}))
    store.close()
    return 0 if r["state"] == "done" and ok == len(r["targets"]) else 1


def cmd_status(a):
    from headend import ota_store
    store = _db(a)
    if a.meter:
        out = ota_store.meter_state(store, a.meter)
    elif a.rollout:
        out = ota_store.rollout(store, a.rollout)
        if out is None:
            raise OtaError("no rollout %d" % a.rollout)
    else:
        out = ota_store.rollouts(store)
    store.close()
    print(json.dumps(out, indent=1))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="lipari ota", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen", help="new Ed25519 signing key")
    k.add_argument("--dir", default=ota.DEFAULT_DIR)
    k.add_argument("--force", action="store_true", help="replace an existing key")
    r = sub.add_parser("release", help="build and sign a release")
    r.add_argument("--key", default=os.path.join(ota.DEFAULT_DIR, "ota.key"))
    r.add_argument("--board", action="append", required=True,
                   help="board it is for (module in boards/ or its NAME); repeat for more")
    r.add_argument("--src", default=ota.FIRMWARE, help="firmware tree (default firmware/)")
    r.add_argument("--version", help="default: the tree's version.py")
    r.add_argument("--min-version", help="anti-rollback floor meters keep once they confirm "
                   "this release (default: its own version)")
    r.add_argument("--expires", type=int, help="epoch s after which meters refuse it")
    r.add_argument("--expires-days", type=float, help="default %d" % ota.EXPIRES_DAYS)
    r.add_argument("--block", type=int, default=ota.BLOCK, help="bytes per checked block")
    r.add_argument("--trial-s", type=int, default=ota.TRIAL_S,
                   help="health deadline of the trial boot (meter time)")
    r.add_argument("--downgrade", action="store_true",
                   help="allow meters running a newer version to install it")
    r.add_argument("--kind", choices=ota.KINDS, default="mpy",
                   help="payload: mpy (.mpy files into slot directories, default) or romfs "
                   "(the board's ROMFS image, for meters with two ROMFS slots; one --board)")
    r.add_argument("--out", default=os.path.join(ota.DEFAULT_DIR, "releases"))
    u = sub.add_parser("push", help="offer a release to meters, in stages")
    u.add_argument("release", help="release directory or version under --releases")
    u.add_argument("--releases", default=os.path.join(ota.DEFAULT_DIR, "releases"))
    u.add_argument("--meter", action="append", help="meter id (or a comma list); repeat")
    u.add_argument("--fleet", action="store_true",
                   help="every meter of the release's boards known to the database")
    u.add_argument("--stages", help="cumulative percentages, e.g. 10,50,100 (default 100)")
    u.add_argument("--max-fail", type=float, default=0.0,
                   help="halt when more than this share of the offered meters failed")
    u.add_argument("--stage-timeout", type=float, default=3600,
                   help="seconds a stage may take; a meter without a result then failed")
    u.add_argument("--pub", default=os.path.join(ota.DEFAULT_DIR, "ota.pub"))
    u.add_argument("--no-verify", action="store_true",
                   help="push without checking the release first (tests of meters)")
    u.add_argument("--http", type=int, default=None,
                   help="also serve images over HTTP on this port (0 = any); Wi-Fi meters "
                   "then download by HTTP")
    u.add_argument("--http-host", default="127.0.0.1")
    u.add_argument("--http-base", default=None, help="URL base meters use for the images")
    u.add_argument("--db", default=ENV("LIPARI_DB", "sqlite:///var/lipari.db"))
    u.add_argument("--by", default=ENV("USER"), help="who pushes (recorded)")
    _broker_args(u)
    s = sub.add_parser("status", help="rollouts, or one meter's OTA state")
    s.add_argument("--meter")
    s.add_argument("--rollout", type=int)
    s.add_argument("--db", default=ENV("LIPARI_DB", "sqlite:///var/lipari.db"))
    a = p.parse_args(argv)
    try:
        return {"keygen": cmd_keygen, "release": cmd_release, "push": cmd_push,
                "status": cmd_status}[a.cmd](a)
    except OtaError as e:
        print("lipari ota: %s" % e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
