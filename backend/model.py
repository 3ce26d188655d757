"""`ZeroShotModel`: the Label Studio model, with the familiar `predict(tasks, context)` and
`fit(event, data)` of label-studio-ml backends. It delegates to the process's `Backend`
(runtime.py), where the request path runs phase by phase (predict/pipeline.py):

    label config → label spaces → prompt plans → heads (text, cached)
    task → image ref → bytes → RGB image → tensor → embedding (batched) → probabilities → regions
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import Settings
from .runtime import Backend


class ZeroShotModel:
    """Zero-shot image classifier speaking Label Studio's ML-backend protocol."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @classmethod
    def from_settings(cls, settings: Settings) -> ZeroShotModel:
        return cls(Backend(settings))

    async def setup(self, label_config: str, project: str | None = None,
                    hostname: str | None = None, access_token: str | None = None) -> str:
        """Validate the config, remember how to reach Label Studio; returns the model_version."""
        return await self.backend.setup(label_config, project, hostname, access_token)

    async def predict(self, tasks: Sequence[dict[str, Any]],
                      context: dict[str, Any] | None = None, *, label_config: str,
                      project: str | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order; a failing task gets an empty one."""
        return await self.backend.predict(tasks, context, label_config=label_config,
                                          project=project, **kwargs)

    async def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Record a Label Studio event (durably, before this returns); START_TRAINING queues a
        fit of the project's head."""
        return await self.backend.fit(event, data)
