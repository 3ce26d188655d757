# A stand-in for heartexlabs/label-studio of docker/compose.yaml, installed from PyPI where no
# container registry is reachable (scripts/docker-smoke.sh compose). Same port, data directory
# and admin-user variables (LABEL_STUDIO_USERNAME, _PASSWORD, _USER_TOKEN) as the official image.
ARG BASE_IMAGE=python:3.12-slim-bookworm
# hadolint ignore=DL3006
FROM ${BASE_IMAGE}
ARG LABEL_STUDIO_VERSION=1.23.2
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN python3 -m venv /opt/label-studio \
    && /opt/label-studio/bin/pip install --no-cache-dir "label-studio==$LABEL_STUDIO_VERSION" \
    && useradd --uid 1001 --create-home label-studio \
    && mkdir -p /label-studio/data && chown -R 1001:1001 /label-studio
# offline: no Sentry, analytics, version check or LaunchDarkly calls
ENV PATH=/opt/label-studio/bin:$PATH \
    LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data \
    SENTRY_DSN="" FRONTEND_SENTRY_DSN="" COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false \
    FEATURE_FLAGS_OFFLINE=true PYTHONUNBUFFERED=1
WORKDIR /label-studio
USER 1001
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
