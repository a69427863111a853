# The firmware's one version number (semantic: MAJOR.MINOR.PATCH). main.py, the status
# message (comm/wiring.py), the OTA agent and `lipari ota release` all read it from here;
# a release built with `lipari ota release --version X` rewrites this file in its payload.
VERSION = "0.1.0"


def parse(s):
    """"1.2.3" -> (1, 2, 3); ValueError for anything else (each part 0..255)."""
    parts = s.split(".") if isinstance(s, str) else ()
    if len(parts) != 3:
        raise ValueError("version %r is not MAJOR.MINOR.PATCH" % (s,))
    out = []
    for p in parts:
        if not p.isdigit() or len(p) > 3 or int(p) > 255:
            raise ValueError("version %r: each part is a number 0..255" % (s,))
        out.append(int(p))
    return tuple(out)


def number(s):
    """"1.2.3" -> 0x010203: one integer that orders like the versions (the OTA switch
    record keeps the anti-rollback floor in this form)."""
    a, b, c = parse(s)
    return a << 16 | b << 8 | c
