# MicroPython manifest of the virtual unix_sim_1ph board: the meter firmware, the board
# module under its own name (the unix port runs main.py --board unix_sim_1ph) and the
# simulated hardware it builds (sim/), for the 32-bit unix build that stands in for a
# board's firmware image in the tests and the RAM figures (tools/mpbuild.py, docs/ram.md).
include("../firmware.py")
module("unix_sim_1ph.py", base_path="../..")
package("sim", base_path="../../..")
