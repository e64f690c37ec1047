FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system app && useradd --system --gid app --home-dir /app --no-create-home app

WORKDIR /app

COPY pyproject.toml README.md ./
COPY orchestrator/ ./orchestrator/
COPY agents/ ./agents/
COPY schemas/ ./schemas/
COPY examples/ ./examples/

RUN pip install --no-cache-dir . && chown -R app:app /app

USER app

CMD ["orchestrator", "worker"]
