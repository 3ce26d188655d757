"""Prometheus metrics, served on `/metrics`. Names carry units; labels stay low-cardinality."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "backend_http_requests_total", "HTTP requests by route and status code", ["route", "status"]
)
REQUEST_SECONDS = Histogram(
    "backend_http_request_duration_seconds", "HTTP request latency by route", ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
)
SHED = Counter("backend_requests_shed_total", "Requests refused with 503 under overload")
TASKS = Counter("backend_predict_tasks_total", "Tasks predicted, by outcome", ["outcome"])
TASK_FAILURES = Counter(
    "backend_task_failures_total", "Tasks (or controls) that failed, by error kind", ["kind"]
)
IMAGES_FETCHED = Counter(
    "backend_images_fetched_total",
    "Images downloaded or read from local files (data: URIs not counted)",
)
IMAGES_ENCODED = Counter("backend_images_encoded_total", "Images run through the image tower")
PROMPTS_ENCODED = Counter("backend_prompts_encoded_total", "Prompts run through the text tower")
TEXT_CACHE = Counter(
    "backend_text_cache_lookups_total", "Prompt embedding lookups, by hit or miss", ["result"]
)
CORRECTIONS = Counter("backend_corrections_logged_total", "Annotation events logged")
EMBEDDING_CACHE = Counter(
    "backend_embedding_cache_lookups_total", "Image embedding lookups, by hit or miss", ["result"]
)
SPOOLED = Gauge("backend_spooled_entries", "Log entries waiting in the local spool for the store")
DEAD_LETTERS = Counter(
    "backend_spool_dead_letters_total",
    "Log entries that could never be applied, set aside in MODEL_DIR/spool/dead-letters.jsonl",
)
SPOOL_REPLAY_RESTARTS = Counter(
    "backend_spool_replay_restarts_total", "Times the spool replay thread crashed and restarted"
)
SPOOL_REPLAY_ALIVE = Gauge("backend_spool_replay_alive", "1 while the spool replay thread runs")
WEBHOOKS = Counter(
    "backend_webhook_events_total",
    "Webhook events received, by action (Label Studio's actions; anything else is \"other\")",
    ["action"],
)
WEBHOOK_ACTIONS = frozenset({
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "START_TRAINING", "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED",
    "TASKS_DELETED", "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED",
    "REVIEW_CREATED", "REVIEW_UPDATED", "REVIEWS_DELETED",
})
"""The `action` label's values besides "other": one series each, whatever callers send."""
MODEL_LOAD_SECONDS = Gauge("backend_model_load_seconds", "Time the model took to load")
MODEL_READY = Gauge("backend_model_ready", "1 once the model is loaded and serving")
INFERENCE_QUEUE = Gauge("backend_inference_queue_items", "Work items waiting for the model")
HEAD_FITS = Counter(
    "backend_head_fits_total", "Adapted-head fits, by outcome (published, kept, failed)",
    ["outcome"],
)
HEAD_FIT_SECONDS = Histogram(
    "backend_head_fit_duration_seconds", "Time to fit a project's heads from its corrections",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
INFERENCE_BATCH_SIZE = Histogram(
    "backend_inference_batch_size", "Images per encoder batch",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
STORE_ERRORS = Counter(
    "backend_store_errors_total", "Store calls that failed (store unreachable or timed out)",
    ["store"],
)
LABEL_STUDIO_CALL_SECONDS = Histogram(
    "backend_labelstudio_call_duration_seconds",
    "Calls to Label Studio's API by pre-label jobs (task pages, prediction imports)", ["call"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DECODE_PROCESSES = Gauge(
    "backend_decode_processes", "Decode processes of the data plane that are alive"
)
DECODE_PROCESS_RESTARTS = Counter(
    "backend_decode_process_restarts_total",
    "Decode processes that died (killed, crashed in a decoder) and were restarted",
)
PLANE_CPU_SECONDS = Counter(
    "backend_plane_cpu_seconds_total",
    "CPU seconds the decode processes spent, by stage (fetch: downloading and the process's "
    "event loop; hash; decode; preprocess: resize, crop and the copy into shared memory)",
    ["stage"],
)
PRELABEL_TASKS = Counter(
    "backend_prelabel_tasks_total", "Tasks worked by pre-label jobs, by outcome (done, failed)",
    ["outcome"],
)


def webhook_action(action: str) -> str:
    """The `action` label for a webhook: a Label Studio action, or "other"."""
    return action if action in WEBHOOK_ACTIONS else "other"
