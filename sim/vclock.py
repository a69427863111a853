# Virtual clocks with the method set of firmware/clock.py's Clock, for the simulated
# meter (CPython and the MicroPython unix port): StepClock (deterministic, moves only when
# a task sleeps) and ScaledClock (speed times real time). They are defined in
# sim/bridgelink.py, the one module of sim/ a bridged board loads into the firmware's
# interpreter (docs/decisions/0017); this name stays for the in-process boards and tests.
from sim.bridgelink import DEFAULT_EPOCH, StepClock, ScaledClock  # noqa: F401
