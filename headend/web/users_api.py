"""User administration over the API (admin only; `lipari user` does the same on the
server). Every change is written to the audit log (action `user`)."""
from typing import Annotated, Optional

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from headend.users import ROLES, Principal, UserError
from headend.web.auth import require
from headend.web.errors import ApiError
from headend.web.state import WebState, get_state

router = APIRouter(prefix="/users", tags=["users"])
Admin = Annotated[Principal, Depends(require("admin"))]
ROLE_RX = "^(%s)$" % "|".join(ROLES)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    role: str = Field(pattern=ROLE_RX)
    meters: Optional[list[Annotated[str, Field(min_length=1, max_length=64)]]] = Field(
        None, max_length=10000, description="meter ids it may see; null = all")
    password: Optional[str] = Field(None, min_length=10, max_length=256,
                                    description="default: a generated one, in the answer")


class UserChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Optional[str] = Field(None, pattern=ROLE_RX)
    meters: Optional[list[Annotated[str, Field(min_length=1, max_length=64)]]] = Field(
        None, max_length=10000)
    all_meters: bool = Field(False, description="true: lift a meter restriction")
    disabled: Optional[bool] = None


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Optional[str] = Field(None, max_length=100)
    role: Optional[str] = Field(None, pattern=ROLE_RX)


def _do(st, who, what, args, fn):
    try:
        out = fn()
    except UserError as e:
        st.audit.write(who, None, "user", what, args, "refused", {"error": str(e)})
        raise ApiError(400, str(e))
    st.audit.write(who, None, "user", what, args, "ok")
    return out


@router.get("", summary="Users (admin)")
def users(who: Admin, st: WebState = Depends(get_state)):
    return st.users.list()


@router.post("", summary="Create a user (admin); the answer holds its password once")
def add_user(body: NewUser, who: Admin, st: WebState = Depends(get_state)):
    args = {"name": body.name, "role": body.role, "meters": body.meters}
    pw = _do(st, who, "user_add", args,
             lambda: st.users.add(body.name, body.role, body.password, body.meters))
    return {"name": body.name, "role": body.role, "meters": body.meters,
            "password": None if body.password else pw}


@router.patch("/{name}", summary="Change a user's role, meters or disabled state (admin)")
def change_user(name: str, body: UserChange, who: Admin, st: WebState = Depends(get_state)):
    meters = None if body.all_meters else (body.meters if body.meters is not None else False)
    args = dict(body.model_dump(exclude_none=True), name=name)
    _do(st, who, "user_change", args,
        lambda: st.users.update(name, body.role, meters, body.disabled))
    u = st.users.get(name)
    return {k: u[k] for k in ("name", "role", "meters", "disabled")}


@router.post("/{name}/tokens", summary="Create an API token for a user (admin); the answer "
                                        "holds the token once")
def add_token(name: str, body: NewToken, who: Admin, st: WebState = Depends(get_state)):
    tid, tok = _do(st, who, "token_add", dict(body.model_dump(exclude_none=True), name=name),
                   lambda: st.users.new_token(name, body.label, body.role))
    return {"id": tid, "name": name, "token": tok}
