#!/usr/bin/env bash
# Audit the installed environment for packages with known vulnerabilities, with pip-audit
# against PyPI's vulnerability data (the per-release JSON API, pypi.org/pypi/NAME/VERSION/json).
#
#   bash scripts/audit.sh               # VENV=path/to/venv to audit another environment
#
# Exit status: 0 no known vulnerability but the ignored ones below; 1 vulnerabilities found;
# 2 the audit could not be completed. It never passes an incomplete audit: pip-audit itself
# only *skips* a package whose lookup fails (a proxy or mirror answering 404, say) and exits 0
# even when it skipped every package, so this script fails then, naming what was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Advisories ignored, each with why: only those no version bump available here fixes, or that
# cannot affect this project. Review this list whenever a dependency changes.
#
# PyJWT 2.13.0: the 13 advisories PYSEC-2026-4140…4152, fixed in 2.14.0. label-studio-sdk
# 2.1.2, the latest, requires pyjwt<2.14: pyjwt>=2.14 resolves only by downgrading the SDK to
# 2.1.0. And none can reach this backend: it never calls PyJWT (it reads the expiry of Label
# Studio's token itself, backend/labelstudio/client.py) and uses the SDK only to parse label configs
# (backend/labelstudio/label_config.py), never its token client.
IGNORE=(
  GHSA-r6x4-923q-g947  # HMAC key validation: we never verify signatures with HMAC keys
  GHSA-ffc3-869f-jxw9  # HMAC key validation: idem
  GHSA-p4g4-x82p-q773  # HMAC key validation: idem
  GHSA-w2cx-738m-mc7w  # HMAC key validation: idem
  GHSA-pxh4-856f-4h89  # HMAC keys loaded through PyJWK: we use no PyJWK
  GHSA-9v7f-9g4p-ffgj  # PyJWKClient follows redirects: we fetch no JWKS
  GHSA-2gx3-rcp4-g85q  # PyJWKClient JWKS refresh storm: we fetch no JWKS
  GHSA-8wjv-2p76-3863  # recursion on nested JWS/JWK input: we decode no JWS with PyJWT
  GHSA-w6j9-cwv2-h6wq  # recursion on malformed JWK sets: we parse no JWK set
  GHSA-hxm8-2xgr-2p9m  # compact JWS encoding rules when decoding: we decode no JWS with PyJWT
  GHSA-9j54-fg26-wv3r  # public-key material accepted as HMAC secret: we prepare no keys
  GHSA-jwrc-g2q2-pq5p  # ReDoS in is_pem_format (HMAC key preparation): we prepare no keys
  GHSA-42vr-xj54-vc7v  # RecursionError parsing a token before verification: we parse none
  GHSA-gvp8-978c-rx2q  # claim verification on a reused options dict: we verify no claims
)

if [[ ! -x "$VENV/bin/pip-audit" ]]; then
  echo "audit: pip-audit is not installed in $VENV: $VENV/bin/pip install pip-audit" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --cache-dir: a fresh one, so every lookup reaches PyPI now (never a cached answer)
if ! "$VENV/bin/pip-audit" --vulnerability-service pypi --skip-editable --aliases on \
    --desc off --progress-spinner off --timeout 30 --cache-dir "$work/cache" \
    --format json --output "$work/report.json" "${IGNORE[@]/#/--ignore-vuln=}" \
    2>"$work/stderr" && [[ ! -s "$work/report.json" ]]; then
  tail -n 20 "$work/stderr" >&2
  echo "audit: FAILED, no report: could pip-audit reach https://pypi.org? (offline, proxy?)" >&2
  exit 2
fi

"$VENV/bin/python" - "$work/report.json" <<'PY'
"""Fail on any package that was not audited, then on any vulnerability pip-audit reported."""
import json
import sys

deps = json.load(open(sys.argv[1]))["dependencies"]
ours = "distribution marked as editable"  # this project itself (--skip-editable)
skipped = [d for d in deps if "skip_reason" in d and d["skip_reason"] != ours]
if skipped:
    for d in skipped[:5]:
        print(f"  {d['name']}: {d['skip_reason']}", file=sys.stderr)
    print(f"audit: FAILED, incomplete: {len(skipped)} of {len(deps)} packages could not be "
          "looked up. PyPI's per-release JSON API (https://pypi.org/pypi/NAME/VERSION/json) is "
          "unreachable from here or filtered (a proxy or mirror that answers 404); run where "
          "pypi.org can be reached directly.", file=sys.stderr)
    sys.exit(2)
found = [(d["name"], d["version"], v) for d in deps for v in d.get("vulns", [])]
for name, version, vuln in found:
    ids = ", ".join([vuln["id"], *vuln.get("aliases", [])])
    print(f"{name} {version}: {ids}; fixed in {', '.join(vuln['fix_versions']) or 'no release'}")
audited = sum("skip_reason" not in d for d in deps)
print(f"audit: {audited} packages audited, {len(found)} known vulnerabilities "
      "(not counting the ignored ones in scripts/audit.sh)")
sys.exit(1 if found else 0)
PY
