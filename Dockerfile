# llm-gateway in a container:
#   docker build -t llm-gateway .
#   docker run -p 8080:8080 -v "$PWD/keys.json:/app/keys.json:ro" llm-gateway
# Pin the base by digest (python:3.11-slim@sha256:…) for production builds.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies before the code: a code change does not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

# A non-root user that can write the log directory (mount a volume there to keep the log).
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
    && mkdir /app/logs \
    && chown app:app /app/logs

COPY gateway.py .
COPY proxy/ proxy/

# Listen on every interface; keys.json is mounted read-only at run time, never baked in.
# The log goes to stdout unless LOG_TO_FILE=true (then to the log directory).
ENV SERVER_HOST=0.0.0.0 \
    SERVER_PORT=8080 \
    KEYS_FILE_PATH=/app/keys.json \
    LOG_FILE_PATH=/app/logs/interactions.jsonl

# Numeric, so a runtime can tell it is not root without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080

# No curl in a slim image: Python's urllib asks /health on the port the gateway listens on,
# directly: never through HTTP_PROXY (the outbound proxy's variables), asked for its loopback.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.build_opener(urllib.request.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('SERVER_PORT', '8080'), timeout=2)"]

# Exec form: the gateway is PID 1, so `docker stop`'s SIGTERM reaches it and it drains.
CMD ["python", "gateway.py"]
