# The firmware's STPM3x register map (firmware/drivers/stpm3x_map.py) for the simulator.
# Under MicroPython and in the tests firmware/ is usually on the path; a process that
# only has the repository on it (a CPython host process, a bare MICROPYPATH) gets
# <repo>/firmware added here (string handling: MicroPython has no os.path).
try:
    from drivers import stpm3x_map as M  # noqa: F401
except ImportError:
    import sys
    _f = __file__.replace("\\", "/")
    _i = _f.rfind("/sim/")
    sys.path.append((_f[:_i] if _i >= 0 else ".") + "/firmware")
    from drivers import stpm3x_map as M  # noqa: F401
