"""What pre-label jobs need from the backend that predicts, typed here so that jobs import
nothing above them: the composition root (or the label-studio-ml facade) satisfies it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..adapt.registry import ServedHead
    from ..config import Settings
    from ..labelstudio.client import LabelStudioAccess
    from ..labelstudio.label_config import ParsedConfig
    from ..store import Store
    from ..zeroshot.scoring import ZeroShotHead

Task = dict[str, Any]


class PredictContext(Protocol):
    """What predicting for one label config and project needs."""

    @property
    def parsed(self) -> ParsedConfig: ...
    @property
    def heads(self) -> tuple[ZeroShotHead, ...]: ...
    @property
    def model_version(self) -> str: ...
    @property
    def ls(self) -> LabelStudioAccess | None: ...
    @property
    def project(self) -> str | None: ...
    @property
    def active(self) -> ServedHead: ...


class Predictor(Protocol):
    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> Store: ...

    async def context(self, label_config: str, project: str | None = None,
                      head: str | None = None) -> PredictContext:
        """`head` pins a stored head (a job keeps the one it started with)."""
        ...

    def label_studio(self, project: str) -> LabelStudioAccess | None:
        """The Label Studio (URL and token) to reach for `project`, if known."""
        ...

    async def predict(self, tasks: Sequence[Task], context: dict[str, Any] | None = None, *,
                      label_config: str, project: str | None = None, head: str | None = None,
                      background: bool = False) -> list[dict[str, Any]]:
        """One Label Studio prediction per task, in order (a failed task: `error`, no
        `result`); `background` work yields to Label Studio's own requests."""
        ...


class LoadedPredictor(Predictor, Protocol):
    """A predictor a worker process owns: it loads the model, and closes it at the end."""

    @property
    def model_label(self) -> str: ...

    def start(self) -> None: ...

    async def wait_ready(self, timeout: float) -> object: ...

    async def aclose(self) -> None: ...
