"""Triton's model repository extension: POST /v2/repository/index, /v2/repository/models/{m}/load and
/v2/repository/models/{m}/unload, as tritonclient's get_model_repository_index, load_model and
unload_model send them.

Behind the admin key (service/auth.py answers 403 while none is set, 401 to a wrong one); the work is
service/reloader.py's. The gRPC service's repository RPCs (service/api/grpc_service.py) do the same. Load and unload answer once done: after a load the new version serves, after an
unload the model's requests get 404 and those it had accepted have been answered.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, StrictBool

from service.api.common import state
from service.api.errors import ERROR_RESPONSES, ErrorBody
from service.api.kserve import JsonRoute
from service.errors import InvalidInput
from service.strict import StrictModel

router = APIRouter(tags=["Model repository"], route_class=JsonRoute, responses={
    **ERROR_RESPONSES,
    401: {"model": ErrorBody, "description": "missing or wrong admin key"},
    403: {"model": ErrorBody, "description": "the model repository routes are disabled: no BERTSERVE_ADMIN_KEY"},
})


class RepositoryIndexRequest(StrictModel):
    ready: StrictBool | None = Field(False, description="true: only the versions ready for inference")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
    reason: str = Field(description="why the version is not READY, e.g. unloaded, a failed verification, "
                                    "or not selected by the version policy; empty when READY")


class RepositoryLoadRequest(StrictModel):
    parameters: dict[str, Any] | None = Field(
        None, description="Triton's config and file: overrides are not supported: a model loads as published")


class UnloadParameters(StrictModel):
    unload_dependents: StrictBool = Field(False, description="accepted; no model here has dependents")


class RepositoryUnloadRequest(StrictModel):
    parameters: UnloadParameters | None = None


class RepositoryActionResponse(StrictModel):
    """Empty on success, as Triton answers."""


def check_load_parameters(keys: Iterable[str]) -> None:
    """A load request's parameters: none is supported (the gRPC RepositoryModelLoad checks with this too)."""
    for key in keys:
        if key == "config" or key.startswith("file:"):
            raise InvalidInput(f"parameters.{key[:64]}: overriding a model's configuration or files is not "
                               f"supported; a model loads as published in the store, with its manifest")
        raise InvalidInput(f"parameters.{key[:64]}: unknown load parameter; none are supported")


@router.post("/v2/repository/index", response_model=list[RepositoryModel])
async def repository_index(request: Request, body: RepositoryIndexRequest | None = None) -> list[dict]:
    """Every version in the model store or in the server, with its state and the reason for it."""
    return await state(request).reloader.index(ready_only=bool(body and body.ready))


@router.post("/v2/repository/models/{model}/load", response_model=RepositoryActionResponse,
             responses={400: {"model": ErrorBody, "description": "a version the policy picks failed to load; "
                                                               "what served before still serves"},
                        404: {"model": ErrorBody, "description": "no such model in the model store"}})
async def load_model(model: str, request: Request, body: RepositoryLoadRequest | None = None) -> dict:
    """Load, or reload, a model from the store under the version policy: new versions are loaded and
    warmed up before they take traffic, versions the policy drops are drained, then unloaded."""
    check_load_parameters((body.parameters or {}) if body else ())
    await state(request).reloader.load(model)
    return {}


@router.post("/v2/repository/models/{model}/unload", response_model=RepositoryActionResponse,
             responses={404: {"model": ErrorBody, "description": "the model is neither served nor in the store"}})
async def unload_model(model: str, request: Request, body: RepositoryUnloadRequest | None = None) -> dict:
    """Unload every version of a model: new requests get 404 at once, accepted ones are answered first.
    Store polling leaves the model unloaded until it is loaded again."""
    await state(request).reloader.unload(model)
    return {}
