# MicroPython manifest of the 32-bit test build (tools/mpbuild.py, make setup): the
# virtual three-phase board's image (firmware, board module, simulated hardware) plus
# the heap probe the RAM tests and benchmarks read (fw32_probe.py), frozen like the rest
# so that it takes no heap for its code.
include("../../boards/manifests/unix_sim_3ph/manifest.py")
module("fw32_probe.py")
