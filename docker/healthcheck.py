"""Docker HEALTHCHECK: exit 0 if the backend answers GET /health with "status": "UP".

Standard library only (no curl in the image, and importing the backend would cost seconds of
CPU every interval). Uses PORT and, when Basic auth is on, BASIC_AUTH_USER/BASIC_AUTH_PASS.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request


def main() -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{os.environ.get('PORT', '9090')}/health")
    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(request, timeout=4) as response:
            status = json.load(response).get("status")
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if status == "UP" else 1


if __name__ == "__main__":
    sys.exit(main())
