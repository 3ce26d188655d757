"""The backend's error hierarchy.

Every error message says what went wrong *and* what to do about it, because it ends up in a
log line or in Label Studio's ML-backend status, read by someone who did not write this code.

    BackendError
    ├── ConfigError            a setting is missing or invalid (names the variable to set)
    ├── LabelConfigError       the project's label config has nothing this backend can predict
    ├── ModelUnavailable       the model is still loading, or failed to load (says why)
    ├── StoreUnavailable       Redis cannot be reached (writes are spooled, nothing is lost)
    ├── LimitExceeded          a request is larger than the configured limits (413)
    ├── Overloaded             too much work in progress; retry shortly (503)
    ├── HeadNotFound           a rollback names an adapted head that does not exist (404)
    ├── LabelStudioError       a Label Studio API call failed (names the call and the fix)
    ├── InvalidEvent           a webhook event cannot be recorded as it is (400, names the field)
    ├── ExportError            an export request is bad: filter, format, output (422)
    ├── ReviewError            a selection or review cannot be made (422)
    ├── JobNotFound            no pre-label job has this id (404)
    ├── JobRunning             another live process is already planning the job (409)
    ├── VersionMismatch        a worker predicts another model_version than its job's
    └── TaskError              one task cannot be predicted; only that task fails
        └── ImageError         its image cannot be used
            ├── ImageRefused   the image reference is not one we fetch (scheme, form)
            ├── FetchError     download failed (network, status, size limit, timeout)
            └── DecodeError    the bytes are not a usable image (format, truncation, pixels)
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(BackendError):
    """A setting is missing or invalid; the message names the environment variable."""


class LabelConfigError(BackendError):
    """The label config cannot be served: unsupported tags, no image, bad attributes."""


class ModelUnavailable(BackendError):
    """The model is not ready: still loading, or loading failed (the message says why)."""


class StoreUnavailable(BackendError):
    """The store cannot be reached right now; durable writes go to the local spool."""


class LimitExceeded(BackendError):
    """A request exceeds a configured limit (body size, tasks); the message names the setting."""


class Overloaded(BackendError):
    """Too much work is already in progress; the request was shed before doing any."""


class HeadNotFound(BackendError):
    """A rollback names a head the project does not have."""


class LabelStudioError(BackendError):
    """A call to Label Studio's REST API failed; the message names the call and the fix."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InvalidEvent(BackendError):
    """A webhook event is malformed: it is refused whole, before anything of it is recorded."""


class ExportError(BackendError):
    """A bad export request (filter, format, output); the message says what to fix."""


class ReviewError(BackendError):
    """A selection or review cannot be made (no predictions, unknown control, bad argument)."""


class JobNotFound(BackendError):
    """No pre-label job has this id."""


class JobRunning(BackendError):
    """Another live process is already planning this job."""


class VersionMismatch(BackendError):
    """This process predicts another model_version than the pre-label job it works on; the
    message names the settings to align."""


class TaskError(BackendError):
    """A single task cannot be predicted. Other tasks of the same request are unaffected."""


class ImageError(TaskError):
    """The task's image cannot be used."""


class ImageRefused(ImageError):
    """The image reference has a form or scheme this backend does not fetch."""


class FetchError(ImageError):
    """Downloading the image failed: connection, HTTP status, timeout or size limit."""


class DecodeError(ImageError):
    """The downloaded bytes are not a decodable image within the configured limits."""
