"""Sign-up and activation."""

import uuid
from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel

from tidings.compat.fastapi_events.dispatcher import dispatch

from ..db import database
from ..events import UserEvents

router = APIRouter(prefix="/users", tags=["users"])


class SignUp(BaseModel):
    email: str
    referrer: str | None = None


@router.post("", status_code=201)
async def sign_up(body: SignUp) -> dict[str, str]:
    user_id = uuid.uuid4()
    database.insert("users", {"id": user_id, "email": body.email})
    payload: dict[str, object] = {
        "user_id": str(user_id),
        "email": body.email,
        "created_at": datetime.now(UTC),
    }
    if body.referrer is not None:
        payload["referrer"] = body.referrer
    dispatch(UserEvents.SIGNED_UP, payload=payload)  # validated against SignUpPayload here
    return {"id": str(user_id)}


@router.post("/{user_id}/activate")
def activate(user_id: uuid.UUID) -> dict[str, str]:
    # a plain def endpoint: FastAPI runs it in a worker thread, and dispatch() works there too
    dispatch(UserEvents.ACTIVATED, {"user_id": str(user_id)})
    return {"status": "active"}
