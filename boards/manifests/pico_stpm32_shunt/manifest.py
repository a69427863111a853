# MicroPython manifest of the pico_stpm32_shunt board (rp2 port, RP2_PICO): the meter firmware
# and this board's module, frozen as `board` (what main.py imports on a board; board.py
# here is a link to boards/pico_stpm32_shunt.py). A /board.py on the board's filesystem still
# overrides it ('' comes before '.frozen' in sys.path).
#   make firmware BOARD=pico_stpm32_shunt MPY_DIR=<micropython checkout>
# The port's own frozen modules first (asyncio; on rp2 and esp32 also _boot.py, which
# mounts the filesystem). The unix build that proves this manifest (tools/mpbuild.py)
# passes port_manifest=False: the unix port has none.
options.defaults(port_manifest=True)
if options.port_manifest:
    include("$(PORT_DIR)/boards/manifest.py")
include("../firmware.py")
module("board.py")
