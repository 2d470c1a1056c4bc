# zooserve server image. CPU by default; `docker build --build-arg EXTRA=gpu .` installs
# onnxruntime-gpu instead of onnxruntime (never both: they share one folder) and a CUDA torch.
FROM python:3.11-slim

ARG EXTRA=cpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 \
    ZOOSERVE_REGISTRY=/registry ZOOSERVE_HOST=0.0.0.0 ZOOSERVE_PORT=8000

WORKDIR /app
# a C compiler: Mamba's fused selective scan is built on first use (training/kernels); without
# one the server runs the standard-op prefill, ~1.8x slower (docs/benchmarks.md)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first: the CPU wheel index for the default image keeps it small
RUN if [ "$EXTRA" = "cpu" ]; then \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install torch==2.13.0; \
    fi
COPY pyproject.toml README.md ./
COPY serve ./serve
COPY model_registry ./model_registry
COPY training ./training
RUN pip install ".[${EXTRA}]"

# Mount a registry at /registry (or run `zooserve demo` once to fill one).
VOLUME /registry
EXPOSE 8000
USER nobody
HEALTHCHECK --interval=10s --timeout=2s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready').status != 200)"
CMD ["zooserve", "serve"]
