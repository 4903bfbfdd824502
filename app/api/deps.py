"""Typed dependencies the routes take as parameters (one place that knows where things live)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.fracture


StateDep = Annotated[AppState, Depends(get_state)]
