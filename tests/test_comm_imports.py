"""Every import under firmware/ is one a microcontroller has: the list in
docs/architecture.md ("Device filesystem"), kept exact (nothing outside it is imported,
nothing in it is unused), and never sim/ or headend/. Walks the syntax tree of every
firmware module (imports inside functions and try blocks included) and the names given
to __import__."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FW = os.path.join(ROOT, "firmware")


def allowed():
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    m = re.search(r"Allowed:(.*?)besides the firmware's own modules", text, re.S)
    assert m, "docs/architecture.md lost its list of allowed imports"
    return set(re.findall(r"`([a-z_]+)`", m.group(1)))


def firmware_modules():
    for d, _, files in os.walk(FW):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def own_names():
    # the firmware's own top-level modules and packages (as deployed to the board root)
    return {n[:-3] if n.endswith(".py") else n for n in os.listdir(FW)
            if n.endswith(".py") or os.path.isdir(os.path.join(FW, n))}


def imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            a = node.args[0] if node.args else None
            if isinstance(a, ast.Constant) and isinstance(a.value, str):
                yield node.lineno, a.value.split(".")[0]


def test_firmware_imports_only_what_a_microcontroller_has():
    ok = allowed()
    own = own_names()
    assert {"comm", "drivers", "metering", "util"} <= own, own
    bad, used = [], set()
    for path in firmware_modules():
        for line, name in imports(path):
            if name in own:
                continue
            used.add(name)
            if name not in ok:
                bad.append("%s:%d imports %s" % (os.path.relpath(path, ROOT), line, name))
    assert not bad, "imports outside docs/architecture.md's list:\n" + "\n".join(bad)
    assert not ok - used, "listed in docs/architecture.md but imported nowhere: %s" % (
        sorted(ok - used))


def test_the_walk_sees_a_forbidden_import(tmp_path):
    # the walker itself: sim and headend imports in any form are found
    p = tmp_path / "m.py"
    p.write_text("def f():\n    try:\n        from sim.modem import PtyUart\n    except "
                 "ImportError:\n        import headend.codec as c\n    __import__('sim')\n")
    assert sorted(n for _, n in imports(str(p))) == ["headend", "sim", "sim"]
