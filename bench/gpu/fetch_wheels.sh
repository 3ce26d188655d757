#!/usr/bin/env bash
# Download, into .whl/ of the repository this is run from, the wheels the backend needs that the
# GPU machine's image lacks (it has torch, torchvision, numpy, pillow, httpx, transformers,
# pyarrow, prometheus-client, timm, lxml, requests, ... but no pydantic, fastapi, open_clip,
# aiohttp or label-studio-sdk), and pytest for the GPU decode tests. That machine reaches no
# package registry: the wheels travel with the tree.
#
#   bash bench/gpu/fetch_wheels.sh                 # cp312 manylinux wheels into ./.whl
#   PY_VERSION=3.11 DEST=/tmp/whl311 bash bench/gpu/fetch_wheels.sh   # same set, for a local try
#
# One pinned version per package (two versions of one package stop the whole install), no
# dependencies resolved (--no-deps): the closure is listed here by hand, from what the backend,
# tests/support, tests/images/test_gpu_decode.py and bench import (`python
# bench/gpu/check_imports.py` is the check that it is complete).
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel 2>/dev/null || pwd)
DEST=${DEST:-$ROOT/.whl}
PY_VERSION=${PY_VERSION:-3.12}
PIP=${PIP:-python3 -m pip}

# The backend's own needs ---------------------------------------------------------------------
WHEELS=(
  # HTTP server: FastAPI on Starlette, served by uvicorn (h11, click, anyio, annotated-doc: image)
  fastapi==0.165.0
  starlette==1.10.0
  opentelemetry-api==1.45.2        # imported by fastapi.telemetry at import time
  uvicorn==0.54.0
  sniffio==1.3.1                   # anyio/httpcore import it when present; pyproject pins it
  # image downloads (images/fetch.py) and what aiohttp 3.14 imports at import time (idna: image)
  aiohttp==3.14.5                  # compiled
  aiohappyeyeballs==2.7.1
  aiosignal==1.4.0
  frozenlist==1.8.0                # compiled
  multidict==7.2.1                 # compiled
  propcache==0.5.4                 # compiled
  yarl==1.25.1                     # compiled; aiohttp 3.14.5 needs >= 1.25.1
  attrs==26.1.0                    # the image has one (label-studio-sdk's), its age unknown
  # settings and request models
  pydantic==2.14.4
  pydantic-core==2.50.5            # compiled; exact pin of pydantic 2.14.4
  pydantic-settings==2.16.3
  python-dotenv==1.2.4             # imported by pydantic_settings at import time
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0        # pydantic 2.14 needs >= 4.16; the image's may be older
  # the model
  open-clip-torch==3.3.0           # torch, torchvision, regex, tqdm, huggingface-hub, safetensors,
  ftfy==6.3.1                      #   timm: image
  wcwidth==0.9.4
  # store, and the Redis job queue of the pre-label jobs (rq imported where jobs run)
  redis==8.1.0
  rq==3.0.0
  croniter==7.0.0                  # rq's (python-dateutil: image)
  # label configs: label_studio_sdk.label_interface and what it imports at import time
  label-studio-sdk==2.1.2          # (lxml, requests, urllib3, attrs, wrapt: image)
  jsf==0.11.2
  faker==40.63.0
  rstr==3.2.2
  smart-open==9.0.2
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1                # compiled
  pyjwt==2.13.0
  appdirs==1.4.4
  xmljson==0.2.1
  # the GPU decode tests (tests/images/test_gpu_decode.py): pytest and what it imports
  pytest==9.2.0
  pluggy==1.7.0
  iniconfig==2.3.1
  pygments==2.21.0
  packaging==26.4                  # pytest 9 needs >= 24; the image's may be older
  pytest-timeout==2.4.0            # pyproject's `timeout` option
)

PLATFORMS=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

mkdir -p "$DEST"
# the wheels of another Python version or of an earlier pin would be installed too: start clean
rm -f "$DEST"/*.whl
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}" \
  2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

# one file per package, as many files as pins
shopt -s nullglob
files=("$DEST"/*.whl)
names=$(for f in "${files[@]##*/}"; do echo "${f%%-*}"; done | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ ${#files[@]} -ne ${#WHEELS[@]} || -n $names ]]; then
  echo "expected ${#WHEELS[@]} wheels, one per package; got ${#files[@]}" \
    "(duplicates: ${names:-none})" >&2
  exit 1
fi
printf '%s\n' "${files[@]##*/}"
du -sh "$DEST"
# .whl/ is in .gitignore; an older checkout's is not: keep the wheels out of its commits too
if [[ $DEST == "$ROOT/.whl" ]] && ! git -C "$ROOT" check-ignore -q .whl/x.whl 2>/dev/null; then
  exclude=$(cd "$ROOT" && git rev-parse --git-path info/exclude 2>/dev/null || true)
  [[ -n $exclude && $exclude != /* ]] && exclude=$ROOT/$exclude
  if [[ -n $exclude ]] && ! grep -qx '/.whl/' "$exclude" 2>/dev/null; then
    mkdir -p "$(dirname "$exclude")" && echo /.whl/ >> "$exclude"
    echo "added /.whl/ to $exclude"
  fi
fi
