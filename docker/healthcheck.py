"""Docker HEALTHCHECK: `healthcheck.py [live|ready]`, exit 0 when the backend is live or ready.

live (the default): GET /health answers "status": "UP" (the process serves HTTP).
ready: GET /ready answers 200 "status": "READY" (the model is loaded; 503 while it loads or
after it failed to load). The image's HEALTHCHECK uses ready, so a container whose model
cannot load is `unhealthy`, not `healthy`.

Standard library only (no curl in the image, and importing the backend would cost seconds of
CPU every interval). Uses PORT and, when Basic auth is on, BASIC_AUTH_USER/BASIC_AUTH_PASS.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request

CHECKS = {"live": ("/health", "UP"), "ready": ("/ready", "READY")}


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "live"
    if mode not in CHECKS:
        print(f"usage: healthcheck.py [{'|'.join(CHECKS)}] (got {mode!r})", file=sys.stderr)
        return 2
    path, expected = CHECKS[mode]
    request = urllib.request.Request(f"http://127.0.0.1:{os.environ.get('PORT', '9090')}{path}")
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(request, timeout=4) as response:
            status = json.load(response).get("status")
    except urllib.error.HTTPError as exc:  # /ready's 503 says why: loading, or failed
        print(f"not {mode}: HTTP {exc.code} {exc.read()[:500]!r}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"not {mode}: {exc}", file=sys.stderr)
        return 1
    return 0 if status == expected else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
