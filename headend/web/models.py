"""Request and response models: FastAPI validates requests against them (a bad body is a
400 naming the field) and builds the OpenAPI document from them."""
import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

CMD_RX = r"^[a-z_][a-z0-9_]{0,31}$"


class Meter(BaseModel):
    """One meter of the fleet."""
    id: str
    online: bool
    transport: Optional[str] = Field(None, description="wifi, nbiot, plc")
    fw: Optional[str] = None
    board: Optional[str] = None
    signal: Optional[int] = Field(None, description="dBm")
    last_seen: Optional[float] = Field(None, description="epoch s, head-end clock")
    p_w: Optional[float] = Field(None, description="active power, W (+ import)")
    last_interval_t: Optional[int] = None
    last_interval_seq: Optional[int] = None
    ai_wh: Optional[int] = Field(None, description="import register, Wh")


METERS_JSON = TypeAdapter(list[Meter])       # the fleet list, encoded once per snapshot


class CommandRequest(BaseModel):
    """A command for the meter (docs/protocol.md, "Commands")."""
    model_config = ConfigDict(extra="forbid")
    cmd: str = Field(description="lower-case command name: ping, get, set, time, reboot, "
                                 "calibrate, preset, reset", examples=["ping"])
    args: dict[str, Any] = Field(default_factory=dict, examples=[{"rt_s": 30}])
    timeout_s: Optional[float] = Field(None, gt=0, le=120,
                                       description="how long to wait for the reply "
                                                   "(default 10 s)")

    @field_validator("cmd", mode="before")
    @classmethod
    def _cmd(cls, v):
        if not isinstance(v, str) or not re.match(CMD_RX, v):
            raise ValueError('cmd must be a lower-case command name like "ping" (body: '
                             '{"cmd": "ping", "args": {}})')
        return v

    @field_validator("args", mode="before")
    @classmethod
    def _args(cls, v):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ValueError('args must be a JSON object like {"rt_s": 30}')
        if not _finite(v):
            # 1e999 parses as infinity: JSON cannot carry it to the meter, nor the audit
            # log back to a browser (found by tests/fuzz_harness.py)
            raise ValueError("args: numbers must be finite (1e999 is not a number a meter "
                             "takes)")
        if not _unicode(v):
            # JSON may escape half a UTF-16 pair ("\\ud800"): no such character exists, the
            # meter's UTF-8 and the audit log cannot carry it (found by tests/fuzz_harness.py)
            raise ValueError("args: text must be valid Unicode (a lone surrogate such as "
                             "\\ud800 is not a character)")
        return v


def _finite(v):
    if isinstance(v, float):
        return v == v and v not in (float("inf"), float("-inf"))
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


def _unicode(v):
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(v, dict):
        return all(_unicode(k) and _unicode(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_unicode(x) for x in v)
    return True


class CommandReply(BaseModel):
    meter: str
    cmd: str
    reply: Any = Field(description="the meter's reply: {id, ok, result} or {ok: false, "
                                   "error, msg}")
    elapsed_ms: int


class Health(BaseModel):
    ok: bool
    meters: int
    hub_errors: int
