"""Commands from the dashboard and the API to a meter, through the broker.

The Commander sends with headend.mqttcmd (the same code as `lipari cmd`) and waits for the
reply. It signs when a key file exists for the meter (keys_dir/<meter>.key); the counter
then comes from the store, so that it always increases.
"""
import os
import time

from fastapi import APIRouter, Depends

from headend import ROOT
from headend.policy import command_role
from headend.web.auth import Who
from headend.web.errors import ApiError
from headend.web.meters import Mid
from headend.web.models import CommandReply, CommandRequest
from headend.web.state import WebState, get_state


class Commander:
    def __init__(self, broker, store=None, user=None, password=None, keys_dir="var/keys",
                 tls_ca=None):
        self.broker = broker
        self.store = store
        self.user = user
        self.password = password
        self.tls_ca = tls_ca
        self.keys_dir = keys_dir if os.path.isabs(keys_dir) else os.path.join(ROOT, keys_dir)

    def send(self, meter_id, cmd, args, timeout_s):
        if not self.broker:
            raise ApiError(503, "commands need the broker: start the web server with "
                                "--broker HOST:PORT (lipari system does this)")
        from headend import mqttcmd
        host, _, port = self.broker.rpartition(":")
        key = mqttcmd.load_key(meter_id, self.keys_dir)
        ctr = None
        if key is not None and self.store is not None:
            ctr = self.store.next_cmd_counter(meter_id, floor=time.time_ns() // 1000000)
        try:
            return mqttcmd.send_command(meter_id, cmd, args or {}, host=host or "127.0.0.1",
                                        port=int(port), user=self.user, password=self.password,
                                        key=key, ctr=ctr, timeout_s=timeout_s,
                                        tls_ca=self.tls_ca)
        except mqttcmd.CmdError as e:
            if str(e).startswith("no reply"):
                raise TimeoutError(str(e))
            raise


class NoBroker(Commander):
    def __init__(self):
        Commander.__init__(self, None)


router = APIRouter(tags=["commands"])


@router.post("/meters/{meter}/commands", response_model=CommandReply,
             summary="Send a command to the meter and wait for its reply (operator: ping, "
                     "get, time, reboot, reporting settings; admin: everything else)",
             responses={400: {"description": "bad request"},
                        403: {"description": "the command needs a larger role"},
                        404: {"description": "unknown meter"},
                        502: {"description": "the command failed"},
                        503: {"description": "no broker configured"},
                        504: {"description": "the meter did not answer in time"}})
def command(meter: Mid, body: CommandRequest, who: Who, st: WebState = Depends(get_state)):
    """Only here does a request lead to a (signed) command: after the role check (every
    command needs at least an operator, headend/policy.py), and always written to the
    audit log: a refused attempt once, a command before it leaves and with its outcome."""
    need = command_role(body.cmd, body.args)
    if not who.can(need):
        why = "%r%s needs the %s role; %s is %s" % (
            body.cmd, " of %s" % ", ".join(sorted(body.args)) if body.cmd == "set" else "",
            need, who.name, who.role)
        st.audit.denied(who, meter, body.cmd, body.args, why)
        raise ApiError(403, why)
    timeout_s = body.timeout_s or st.cmd_timeout_s
    ref = st.audit.sent(who, meter, body.cmd, body.args)
    t = time.monotonic()
    outcome, answer = "failed", None
    try:
        reply = st.commander.send(meter, body.cmd, body.args, timeout_s)
        outcome = "ok" if isinstance(reply, dict) and reply.get("ok") else "refused"
        answer = reply
    except ApiError as e:
        answer = {"error": str(e)}
        raise
    except TimeoutError:
        outcome = "timeout"
        answer = {"error": "no answer within %g s" % timeout_s}
        raise ApiError(504, "meter %s did not answer %r within %g s: it may be offline or "
                            "busy. The command stays queued in the broker and runs when the "
                            "meter reconnects." % (meter, body.cmd, timeout_s))
    except Exception as e:
        answer = {"error": str(e)}
        raise ApiError(502, "command %r to meter %s failed: %s" % (body.cmd, meter, e))
    finally:
        st.audit.outcome(ref, who, meter, body.cmd, body.args, outcome, answer)
    st.hub.kick()
    return {"meter": meter, "cmd": body.cmd, "reply": reply,
            "elapsed_ms": int((time.monotonic() - t) * 1000)}
