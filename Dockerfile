# syntax=docker/dockerfile:1
# The extguard image: the ext_proc and ext_authz gRPC server, with its metrics endpoint.
#
#   docker build -t extguard:0.1.0 .
#   docker build -t extguard:0.1.0-presidio --build-arg EXTRAS=presidio .
#
# EXTRAS picks the optional deep engines: "presidio", "llm-guard" or "presidio,llm-guard". The
# default image has the inline detectors only. llm-guard needs PyTorch: set PIP_EXTRA_INDEX_URL
# to a PyTorch CPU wheel index (or a mirror of it), or pip takes a CUDA build of several GB.
# Models for llm-guard are not in the image: mount them and set deep_engines.llm_guard.model_path.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
# Compilers, for any dependency without a wheel for the platform. They stay in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY scripts/install-image.sh scripts/repair-otel-protos.sh ./scripts/
RUN EXTRAS="${EXTRAS}" scripts/install-image.sh /opt/extguard

FROM ${PYTHON_IMAGE}
ARG EXTRAS=""
LABEL org.opencontainers.image.title="extguard" \
      org.opencontainers.image.description="Guard for LLM traffic behind Envoy: ext_proc and ext_authz gRPC servers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.extguard.extras="${EXTRAS}"
RUN groupadd --system --gid 10001 extguard \
    && useradd --system --uid 10001 --gid extguard --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin extguard
COPY --from=build /opt/extguard /opt/extguard
# A starting policy; the Helm chart mounts the real one from a ConfigMap over this path.
COPY examples/policy.yaml /etc/extguard/policy.yaml
# Nothing is written at run time but to /tmp (an emptyDir in the Helm chart), and nothing is
# downloaded: the model hub clients are told to stay offline.
ENV PATH=/opt/extguard/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
USER 10001:10001
# 50051: ext_proc, ext_authz and gRPC health; 9464: Prometheus /metrics.
EXPOSE 50051 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["extguard"]
CMD ["serve", "--config", "/etc/extguard/policy.yaml", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]
