# Lipari bootstrap: chooses the firmware slot and starts it. This file is installed once
# (`lipari deploy`) and is NEVER replaced over the air, so it stays small and is proved
# whole by tests/test_ota_boot.py (every state of the switch record, torn writes, power
# cuts at every flash write). Everything else lives in a slot and can be updated.
#
#   fw/a/, fw/b/     the two slots: compiled firmware (main.mpy + packages), or else
#                    each slot's ROMFS image, mounted at /rom: fw/a.rom, fw/b.rom (unix
#                    board) or ROMFS partition 0, 1 (a board's vfs.rom_ioctl)
#   fw/rec0, rec1    the switch record, two copies; the valid one with the higher
#                    sequence number wins, so a torn write leaves the previous state
#
# Record (24 bytes, little endian): "LPR1", u32 seq, u8 slot (0 = a, 1 = b), u8 state
# (0 confirmed, 1 trial), u8 trial boots, u8 last result (RESULTS), u32 floor (lowest
# version allowed, 0xMMmmpp), u32 spare, u32 CRC-32 of the 20 bytes before it.
#
# A slot on trial boots once: this file counts the boot before starting it; the firmware
# confirms it (ota/agent.py: metering runs and the broker answered) or, past its health
# deadline, writes the rollback itself. A trial that crashes here, or that reaches a
# second boot unconfirmed (reset, watchdog, power cut), goes back to the other slot.
import sys

DIR = "fw"
SLOTS = ("a", "b")
CONFIRMED = 0
TRIAL = 1
# last result codes (also what the head-end shows as the rollback reason)
RESULTS = ("none", "confirmed", "rolled back: crashed at boot",
           "rolled back: not confirmed before the next boot",
           "rolled back: health deadline passed", "rolled back: slot empty")


def crc32(data):
    try:
        from binascii import crc32 as c
        return c(data) & 0xFFFFFFFF
    except ImportError:  # a port without binascii.crc32
        crc = 0xFFFFFFFF
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


def _u32(v):
    return bytes((v & 255, v >> 8 & 255, v >> 16 & 255, v >> 24 & 255))


def _g32(b, i):
    return b[i] | b[i + 1] << 8 | b[i + 2] << 16 | b[i + 3] << 24


def pack(r):
    b = b"LPR1" + _u32(r["seq"]) + bytes((r["slot"], r["state"], r["tries"], r["last"])) + \
        _u32(r["floor"]) + _u32(0)
    return b + _u32(crc32(b))


def unpack(b):
    """24 bytes -> record dict, or None (short, wrong magic, bad CRC, bad field)."""
    if len(b) != 24 or b[:4] != b"LPR1" or _g32(b, 20) != crc32(b[:20]):
        return None
    if b[8] > 1 or b[9] > 1:
        return None
    return {"seq": _g32(b, 4), "slot": b[8], "state": b[9], "tries": b[10], "last": b[11],
            "floor": _g32(b, 12)}


def read_record(d=DIR):
    """The current record (the valid copy with the higher seq), or None."""
    best = None
    for i in (0, 1):
        try:
            with open("%s/rec%d" % (d, i), "rb") as f:
                r = unpack(f.read(25))
        except OSError:
            r = None
        if r is not None and (best is None or r["seq"] > best["seq"]):
            best = r
    return best


def write_record(r, d=DIR):
    """Write r as the next record: seq + 1, into the copy that does not hold the current
    one (seq parity), so that a torn write leaves the current record readable."""
    r = dict(r)
    r["seq"] += 1
    with open("%s/rec%d" % (d, r["seq"] & 1), "wb") as f:
        f.write(pack(r))
    return r


def has_main(p):
    for n in ("main.mpy", "main.py"):
        try:
            open("%s/%s" % (p, n)).close()
            return True
        except OSError:
            pass
    return False


def slot_path(slot, d=DIR):
    """Where the slot's firmware is: its directory when that holds main, else its ROMFS
    image mounted at /rom when that holds main, else None."""
    p = "%s/%s" % (d, SLOTS[slot])
    if has_main(p):
        return p
    try:
        import vfs
        try:
            with open(p + ".rom", "rb") as f:
                img = f.read()
        except OSError:
            img = vfs.rom_ioctl(2, slot)
        try:
            vfs.umount("/rom")
        except OSError:
            pass
        vfs.mount(vfs.VfsRom(img), "/rom")
    except Exception:        # no vfs, no such partition, not a ROMFS image
        return None
    return "/rom" if has_main("/rom") else None


def rollback(r, last, d=DIR):
    r = dict(r)
    r["slot"] ^= 1
    r["state"] = CONFIRMED
    r["tries"] = 0
    r["last"] = last
    return write_record(r, d)


def choose(d=DIR):
    """The slot to start now, after recording what this boot means (trial counted,
    rollback done). Returns the record in force."""
    r = read_record(d)
    if r is None:       # fresh deploy: slot a, confirmed (nothing written: no wear)
        return {"seq": 0, "slot": 0, "state": CONFIRMED, "tries": 0, "last": 0, "floor": 0}
    if r["state"] == TRIAL:
        if slot_path(r["slot"], d) is None:
            return rollback(r, 5, d)
        if r["tries"] >= 1:
            return rollback(r, 3, d)
        r = dict(r)
        r["tries"] = 1
        r = write_record(r, d)
    return r


def reset():
    try:
        import machine
        machine.reset()
    except (ImportError, AttributeError):
        sys.exit(3)       # the unix port: the supervisor restarts the process


def start(d=DIR):
    r = choose(d)
    sys.path.insert(0, slot_path(r["slot"], d) or "%s/%s" % (d, SLOTS[r["slot"]]))
    try:
        import main
        main.BOOT = dict(r, dir=d)
        main.main()
    except Exception as e:           # SystemExit and KeyboardInterrupt pass through
        print('{"type": "error", "msg": "boot: slot %s: %s: %s"}' % (
            SLOTS[r["slot"]], type(e).__name__, str(e).replace('"', "'")))
        if r["state"] == TRIAL:
            rollback(r, 2, d)
        reset()


if __name__ == "__main__":
    start()
