"""The strict pydantic base of every schema a client or a build writes: an unknown field is an error,
so that a misspelt option (``"outputs"``, ``"datatype"``, a recipe key) is refused, not silently ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    # protected_namespaces=(): fields named model_* (model_file, model_version) are ours, not pydantic's.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
