# MicroPython manifest: the meter firmware (firmware/), frozen into a board's image.
# Every board's manifest (boards/manifests/<board>/manifest.py) includes this file and
# adds its board module. Frozen modules run their bytecode in place from flash: only
# their objects take heap, not their code (docs/ram.md).
#
# Every package and module of firmware/ is frozen, so that a new one needs no line here;
# except boot.py, the OTA bootstrap, which lives on the filesystem (docs/ota.md): frozen,
# it would run at every boot in place of the one `lipari deploy` installs.
import os

include("$(MPY_DIR)/extmod/asyncio")

_FW = "../../firmware"          # relative to this file (the manifest tool runs it here)
_NOT_FROZEN = ("boot.py",)
for _name in sorted(os.listdir(_FW)):
    _path = os.path.join(_FW, _name)
    if os.path.isfile(os.path.join(_path, "__init__.py")):
        package(_name, base_path=_FW)
    elif _name.endswith(".py") and _name not in _NOT_FROZEN:
        module(_name, base_path=_FW)
