# MicroPython manifest: the meter firmware (firmware/), frozen into a board's image.
# Every board's manifest (boards/manifests/<board>/manifest.py) includes this file and
# adds its board module. Frozen modules run their bytecode in place from flash: only
# their objects take heap, not their code (docs/ram.md).
include("$(MPY_DIR)/extmod/asyncio")

_FW = "../../firmware"          # relative to this file
for _pkg in ("comm", "drivers", "metering"):
    package(_pkg, base_path=_FW)
for _mod in ("clock.py", "hw.py", "main.py"):   # main: run at boot from the frozen image
    module(_mod, base_path=_FW)
