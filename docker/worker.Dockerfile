# The rollback worker: `python worker.py`, every workflow and activity, task queue `rollback`.
# Not exercised by CI here: Docker cannot run on the machines this project is tested on.
#
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t rollback-worker .
# Run (the config must exist; see rollback.example.yaml and docs/configuration.md):
#   docker run --init -e TEMPORAL_ADDRESS=temporal.example.internal:7233 \
#     -v /etc/rollback/rollback.yaml:/etc/rollback/rollback.yaml:ro \
#     -v rollback-state:/var/lib/rollback rollback-worker
#
# Commands named in rollback.yaml (router.reload_command, test_command, deploy_command,
# releases_command) run inside this container. This image has none of them (no nginx,
# no ssh client): add what your commands need in an image built FROM this one.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml ./
COPY rollback ./rollback
COPY workflows ./workflows
COPY activities ./activities
RUN pip install .
COPY worker.py ./

# state_dir of the example config; mount a volume here (docker-compose.temporal.yml does).
RUN useradd --system --uid 10001 --home-dir /var/lib/rollback rollback \
    && mkdir -p /var/lib/rollback \
    && chown rollback /var/lib/rollback

ENV TEMPORAL_ADDRESS=temporal:7233 \
    TEMPORAL_NAMESPACE=default \
    ROLLBACK_TASK_QUEUE=rollback \
    ROLLBACK_CONFIG=/etc/rollback/rollback.yaml

USER rollback
CMD ["python", "worker.py"]
