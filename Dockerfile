# syntax=docker/dockerfile:1.7
# Build:  docker build --build-arg VERSION=0.1.0 -t applivery-mdm-exporter:0.1.0 .
# Run:    see docs/deploy.md (read-only root, config and token mounted, non-root user).

# ---- build: turn the project and its dependencies into wheels ---------------------------------
FROM python:3.12.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# Only what the package build reads: the metadata (readme and licence included), the lock of
# the runtime dependencies and the package itself. The lock pins every dependency, direct or
# not, to one version, so two builds of one commit install the same (refresh: deploy/lock.py).
COPY pyproject.toml README.md LICENSE requirements.lock ./
COPY exporter/ exporter/
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint requirements.lock .

# ---- runtime: wheels installed offline, no compilers, no build context ------------------------
FROM python:3.12.11-slim-bookworm

ARG VERSION=0.1.0
# The commit built (the release workflow passes it; a local build says "unknown").
ARG REVISION=unknown
LABEL org.opencontainers.image.title="applivery-mdm-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Applivery MDM Windows command batches and actions" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/applivery-mdm-exporter/applivery-mdm-exporter" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.12.11-slim-bookworm"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# The wheels come in through a bind mount, so they never become a layer of this image;
# --no-index guarantees nothing is fetched or compiled here.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
    && groupadd --system --gid 10190 exporter \
    && useradd --system --uid 10190 --gid 10190 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin exporter \
    && install -d -o 10190 -g 10190 -m 0700 /var/lib/applivery-mdm-exporter

# The durable state (--storage.path, a SQLite store): the one directory written besides /tmp.
# As a volume it outlives the container and stays writable under --read-only; a new named
# volume takes the directory's owner from the image, so the non-root user can write to it.
VOLUME ["/var/lib/applivery-mdm-exporter"]

# Bytecode was compiled at install time; at run time nothing is written outside /tmp and the
# state volume, so the root filesystem can be mounted read-only.
# The revision is shown as applivery_exporter_build_info's `revision` label.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APPLIVERY_EXPORTER_REVISION=${REVISION} \
    HOME=/tmp \
    HEALTHCHECK_URL=http://127.0.0.1:10190/-/healthy

# Expected mounts: /etc/applivery-mdm-exporter/config.yaml (read-only),
# /run/secrets/applivery-token (the API token), a tmpfs at /tmp, a volume (named, to keep
# the state across containers) at /var/lib/applivery-mdm-exporter.
USER 10190:10190
EXPOSE 10190

# No curl in the image: the health check is a one-line urllib call (any non-2xx or a refused
# connection raises, and the exit status becomes 1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4).close()"]

ENTRYPOINT ["applivery-mdm-exporter"]
CMD ["--config.file=/etc/applivery-mdm-exporter/config.yaml", "--web.listen-address=:10190", \
     "--log.format=json", "--storage.path=/var/lib/applivery-mdm-exporter"]
