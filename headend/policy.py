"""Which role a command to a meter needs, and how the audit log files it.

operator: ping, get, time, reboot, and `set` of the reporting settings only (how often
          and how the meter reports live data: nothing that moves money or safety);
admin:    everything else: calibrate, preset, reset (counters: money), set of any other
          setting (tariff, interval and demand periods, thresholds, transports, ...), OTA,
          and any command this table does not know.
"""
OPERATOR_CMDS = frozenset(("ping", "get", "time", "reboot"))
OPERATOR_SETTINGS = frozenset(("rt_s", "payload", "ha_discovery", "backlog_per_s"))
ACTIONS = {"set": "setting", "preset": "preset", "reset": "preset",
           "calibrate": "calibration", "ota": "ota"}


def command_role(cmd, args):
    if cmd in OPERATOR_CMDS:
        return "operator"
    if cmd == "set" and isinstance(args, dict) and args and set(args) <= OPERATOR_SETTINGS:
        return "operator"
    return "admin"


def command_action(cmd):
    """The audit log's category: command, setting, preset, calibration or ota."""
    return ACTIONS.get(cmd, "command")
