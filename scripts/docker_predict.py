"""One /predict against a running backend, as Label Studio sends it (standard library only).

    python3 scripts/docker_predict.py http://127.0.0.1:9090

Exit 0 when the task gets a Choices prediction; prints the result.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import urllib.request
import zlib

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="red"/><Choice value="green"/><Choice value="blue"/></Choices></View>')


def png(width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def main(url: str) -> int:
    image = "data:image/png;base64," + base64.b64encode(png()).decode()
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG,
            "project": "1.1700000000"}
    request = urllib.request.Request(url.rstrip("/") + "/predict", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=120) as response:
        results = json.load(response)["results"]
    print("/predict:", json.dumps(results)[:400])
    choices = results[0]["result"][0]["value"]["choices"]
    return 0 if choices and choices[0] in ("red", "green", "blue") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
