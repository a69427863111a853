"""`lipari`: one command line for the host side.

    lipari meter    run one virtual meter (real firmware on micropython + simulated chips)
    lipari headend  ingest meters' MQTT traffic into the database
    lipari web      the dashboard and REST API
    lipari system   broker + head-end + five virtual meters (what `make run` starts)
    lipari cmd      send a command to a meter and print its reply
    lipari user     head-end users, passwords and API tokens (add, passwd, token, list)
    lipari deploy   copy the compiled firmware and a board file to a board (mpremote)
    lipari vboard   a virtual board on a pty that mpremote can flash
    lipari loadtest a simulated fleet against broker + ingest, measured end to end
    lipari ota      signed updates: keygen, release, push, status
"""
import importlib
import sys

# sub-command -> module with main(argv); each module owns its own argument parsing.
COMMANDS = {
    "meter": "headend.meter",
    "headend": "headend.ingest",
    "web": "headend.web",
    "system": "headend.system",
    "cmd": "headend.mqttcmd",
    "user": "headend.users",
    "deploy": "headend.deploy",
    "vboard": "headend.vboard",
    "loadtest": "headend.loadtest",
    "ota": "headend.ota_cli",
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print("lipari: unknown command %r; one of: %s" % (name, ", ".join(COMMANDS)), file=sys.stderr)
        return 2
    try:
        mod = importlib.import_module(COMMANDS[name])
    except ImportError as e:
        print("lipari %s is not available in this build: %s" % (name, e), file=sys.stderr)
        return 2
    try:
        return mod.main(rest) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
