# syntax=docker/dockerfile:1
# One image for every component: `mulambda operator|companion|selector|models|simulate`.
# Without the `grpc` extra on purpose: tensorflow-serving-api pulls in full
# TensorFlow (~2 GB); REST predictions need only httpx.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mulambda/ mulambda/
COPY operator/ operator/
COPY companion/ companion/
# Wheels for the project and its dependencies; the final stage installs them
# offline, so no build tools or caches end up in the image.
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mulambda" \
      org.opencontainers.image.description="Operator, companion and selector for serverless ML model executors" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/mulambda/mulambda"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp TMPDIR=/tmp
# pip compiles bytecode at install time, so the read-only root FS costs nothing.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels mulambda
# Distroless' "nonroot" uid: numeric so runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["mulambda"]
CMD ["--help"]
