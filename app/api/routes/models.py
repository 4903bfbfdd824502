"""The model cards of what is served, with the execution provider each one runs on."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import ServiceDep
from app.api.schemas import ModelList, ServedModel, errors
from app.core.errors import ApiError

router = APIRouter(tags=["models"])


@router.get(
    "/v1/models",
    summary="model cards of every served model",
    response_model=ModelList,
    responses=errors(503),
)
async def list_models(service: ServiceDep) -> ModelList:
    if service.registry is None:
        raise ApiError(503, "not_ready", service.not_ready_reason)
    s = service.settings
    defaults = {s.default_classifier, s.default_detector}
    models = []
    for m in service.registry.models.values():
        if m.role == "orienter":  # not chosen per request: used on every one, or on none
            default = s.orient
        else:
            default = m.name in defaults or len(service.registry.by_role(m.role)) == 1
        models.append({"role": m.role, "default": default, **m.describe()})
    return ModelList(models=[ServedModel.model_validate(m) for m in models])
