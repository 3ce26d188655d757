"""`python -m backend`: the container's command, often PID 1 without an init.

The kernel drops a SIGTERM sent to a PID 1 that has no handler for it, and importing the CLI
(torch, pyarrow) takes seconds: so the handler comes first, and `docker stop` during start-up
ends the process at once, with status 0. `serve` and uvicorn take the signal over later.

PyTorch's OpenMP threads spin for a while after each parallel region (OpenMP's default wait
policy): between encoder batches they burn the cores the decode processes need. Waiting
passively cost the encoder nothing measurable (bench/predict_throughput.py) and roughly halved
the server's CPU per image beside the decode processes (bench/data_plane.py). It must be set
before torch is imported; an explicit OMP_WAIT_POLICY wins.
"""

import os
import signal

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _stop_starting(signum: int, frame: object) -> None:
    raise SystemExit(0)


signal.signal(signal.SIGTERM, _stop_starting)

from .cli import main  # noqa: E402  (after the handler, on purpose)

raise SystemExit(main())
