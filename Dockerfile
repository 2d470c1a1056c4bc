# zooserve server image. Checked with `hadolint --no-color Dockerfile` (tests/ops/test_deploy.py);
# never built on the development machine, which has no container engine (docs/architecture.md,
# "Operations").
#
# Build argument EXTRA picks the runtime build, exactly one of pyproject.toml's extras:
#   docker build -t zooserve .                        EXTRA=cpu (default): onnxruntime, and torch from
#                                                     PyTorch's CPU wheel index (a much smaller image)
#   docker build --build-arg EXTRA=gpu -t zooserve:gpu .
#                                                     onnxruntime-gpu with its CUDA and cuDNN wheels (never
#                                                     beside onnxruntime: they share one folder) and the
#                                                     default torch wheel, which bundles CUDA. Run it with
#                                                     `docker run --gpus all` (NVIDIA Container Toolkit on
#                                                     the host; the driver comes from the host). The server's
#                                                     ZOOSERVE_DEVICE=auto then serves on CUDA.
#
# Runs as user 10001 (no root); the registry is a volume at /registry that this user can write
# (the server writes model.json during rollouts; `zooserve demo --registry /registry` fills it).
FROM python:3.11-slim-bookworm

ARG EXTRA=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ZOOSERVE_REGISTRY=/registry ZOOSERVE_HOST=0.0.0.0 ZOOSERVE_PORT=8000 \
    ZOOSERVE_KERNEL_CACHE=/home/zooserve/.cache/zooserve/kernels

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

# a C compiler: Mamba's fused selective scan is built on first use (training/kernels) into
# ZOOSERVE_KERNEL_CACHE; without one the server runs the standard-op prefill, ~1.8x slower
# (docs/benchmarks.md). Not pinned to exact versions: Debian's security updates replace them within
# bookworm (the base tag fixes the release), and a pin to a superseded version fails the build.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first: the CPU wheel index for the default image keeps it small
RUN case "$EXTRA" in \
        cpu) pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu ;; \
        gpu) pip install torch==2.13.0 ;; \
        *) echo "EXTRA must be cpu or gpu, not '$EXTRA'" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md ./
COPY serve ./serve
COPY model_registry ./model_registry
COPY training ./training
# the project from this folder, with the extra's runtime; its dependency ranges are pyproject.toml's
RUN pip install "./[${EXTRA}]"

# a numeric uid, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd
RUN groupadd --system --gid 10001 zooserve \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/zooserve zooserve \
    && mkdir -p /registry "$ZOOSERVE_KERNEL_CACHE" \
    && chown -R 10001:10001 /registry /home/zooserve
USER 10001:10001

# Mount a registry at /registry (or run `zooserve demo --registry /registry` once to fill one).
VOLUME /registry
EXPOSE 8000
# readiness (strict: every served model has a READY version); the start period covers the load
HEALTHCHECK --interval=10s --timeout=2s --start-period=120s \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2).status != 200)"]
CMD ["zooserve", "serve"]
