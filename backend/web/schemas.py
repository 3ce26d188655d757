"""Request bodies and parameters of the HTTP API, as FastAPI validates them and OpenAPI shows
them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..jobs.executors import ExecutorName
from ..labelstudio.client import ProjectId, project_key

EXAMPLE_CONFIG = ('<View><Image name="image" value="$image"/><Choices name="animal" '
                  'toName="image"><Choice value="Cat"/><Choice value="Dog"/></Choices></View>')
WEBHOOK_BODY = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["action"], "additionalProperties": True,
    "properties": {"action": {"type": "string", "example": "ANNOTATION_CREATED"},
                   "project": {"type": "object"}, "annotation": {}, "task": {}},
}}}, "required": True, "description": "A Label Studio webhook event"}


class ActivateRequest(BaseModel):
    project: str = Field(min_length=1, max_length=100)
    head: str = Field(min_length=1, max_length=40, description="`h3`, or `zero-shot`")


class PrelabelRequest(BaseModel):
    project: int = Field(..., ge=1, description="Label Studio project id", examples=[3])
    executor: ExecutorName | None = Field(
        None, description="local: this process; rq: RQ workers (default: PRELABEL_EXECUTOR)")


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    project: str | int | None = Field(None, examples=["3.1764300000"])
    label_config: str = Field(..., alias="schema", description="The project's label config XML",
                              examples=[EXAMPLE_CONFIG])
    hostname: str | None = None
    access_token: str | None = None
    extra_params: dict[str, Any] | str | None = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    tasks: list[dict[str, Any]] = Field(
        ..., examples=[[{"id": 1, "data": {"image": "data:image/png;base64,iVBORw0KGgo="}}]])
    label_config: str | None = Field(None, examples=[EXAMPLE_CONFIG])
    project: str | int | None = Field(None, examples=["3.1764300000"])
    params: dict[str, Any] | None = None


def project_id(value: str) -> ProjectId:
    """A project id from a query or body: "3", or Label Studio's "3.1700000000"."""
    return project_key(value) or ProjectId(value)
