# A stand-in for the redis image of docker/compose.yaml, made from Debian's redis-server where no
# container registry is reachable (scripts/docker-smoke.sh compose). Like the official image it
# keeps its files in /data and, started without a config file, accepts other containers
# (Debian's redis-server alone would refuse them in protected mode).
ARG BASE_IMAGE=python:3.12-slim-bookworm
# hadolint ignore=DL3006
FROM ${BASE_IMAGE}
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data \
    && printf '%s\n' '#!/bin/sh' \
        'if [ "$1" = redis-server ]; then shift; exec redis-server --protected-mode no "$@"; fi' \
        'exec "$@"' > /usr/local/bin/redis-entrypoint \
    && chmod +x /usr/local/bin/redis-entrypoint
WORKDIR /data
VOLUME ["/data"]
# hadolint ignore=DL3066
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
