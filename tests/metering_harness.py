# Helpers for the metering tests and the benchmark. Importable under MicroPython
# (MICROPYPATH=<repo>/firmware:<repo>/boards:<repo>:<repo>/tests) and CPython.
import os

try:
    import json
except ImportError:  # pragma: no cover
    import ujson as json


def _mount(dev, mkfs=False, point="/lfs"):
    if mkfs:
        os.VfsLfs2.mkfs(dev)
    vfs = os.VfsLfs2(dev)
    os.mount(vfs, point)
    return point


def _umount(point="/lfs"):
    try:
        os.umount(point)
    except Exception:
        pass


def _payload(n):
    # distinct, length-varying payloads so that a mixed-up record cannot pass
    return bytes(((n * 7 + i) & 0xFF) for i in range(40 + (n % 5) * 37))


def store_powercut(saves=20, block_size=4096, blocks=16, tear="half"):
    """Cut power at every program/erase op of `saves` consecutive checkpoints (after a
    few earlier ones), reboot, and check that load() returns the newest completed save or
    the one in progress, never garbage or an older one, and that saving works again."""
    from sim.flash import FlashDev, PowerCut
    from metering.store import Store, StoreError
    dev = FlashDev(block_size, blocks)
    p = _mount(dev, mkfs=True)
    st = Store(p)
    st.load()
    for n in range(1, 4):
        st.save(_payload(n))
    _umount(p)
    base = bytearray(dev.data)
    # ops of a clean run
    dev.ops = 0
    p = _mount(dev)
    st = Store(p)
    st.load()
    for n in range(4, 4 + saves):
        st.save(_payload(n))
    total_ops = dev.ops
    _umount(p)
    res = {"ops": total_ops, "cuts": 0, "bad": [], "outcomes": {}}
    for k in range(1, total_ops + 2):
        dev = dev.reboot()
        dev.data[:] = base
        dev.tear = tear
        dev.cut_at = k
        p = _mount(dev)
        st = Store(p)
        st.load()
        done = 3
        try:
            for n in range(4, 4 + saves):
                st.save(_payload(n))
                done = n
        except (PowerCut, StoreError) as e:
            # MicroPython's block-device glue turns the PowerCut into EIO
            if not dev.dead:
                res["bad"].append((k, "error-without-cut", repr(e)))
            res["cuts"] += 1
        _umount(p)
        dev = dev.reboot()
        p = _mount(dev)
        st = Store(p)
        got = st.load()
        which = None
        for n in range(1, 5 + saves):
            if got == _payload(n):
                which = n
        if which is None or not (done <= which <= done + 1):
            res["bad"].append((k, done, which))
        else:
            key = "%d" % (which - done)
            res["outcomes"][key] = res["outcomes"].get(key, 0) + 1
        try:
            st.save(_payload(99))
            if Store(p).load() != _payload(99):
                res["bad"].append((k, "resave"))
        except Exception as e:
            res["bad"].append((k, "resave-exc", repr(e)))
        _umount(p)
    return res


def store_wear(saves=200, block_size=4096, blocks=32):
    """Programs / erases per checkpoint on littlefs (for the docs' writes-per-day)."""
    from sim.flash import FlashDev
    from metering.store import Store
    dev = FlashDev(block_size, blocks)
    p = _mount(dev, mkfs=True)
    st = Store(p)
    st.load()
    p0, e0, b0 = dev.programs, dev.erases, dev.prog_bytes
    for n in range(saves):
        st.save(_payload(n) * 4)
    _umount(p)
    return {"saves": saves, "programs_per_save": (dev.programs - p0) / saves,
            "erases_per_save": (dev.erases - e0) / saves,
            "bytes_per_save": (dev.prog_bytes - b0) / saves,
            "max_block_erases": max(dev.block_erases)}


def dump(obj):
    print("RESULT " + json.dumps(obj))
