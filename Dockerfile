# One image for the migration job, the workers, beat and Flower (see docker-compose.yml).
#
# Your own saga modules: pass a directory of the build context as APP (default: the
# examples in tasks/). It is copied to /app/<APP>, its requirements.txt (if any) installed,
# and /app is the working directory, so SAGAQ_IMPORTS=<APP>.sagas imports it:
#   docker build --build-arg APP=myapp -t myapp-sagas .
# Or build FROM this image and COPY your package into /app yourself.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY sagaq ./sagaq
COPY tasks ./tasks
RUN pip install . && rm -rf build

ARG APP=tasks
COPY ${APP} /app/${APP}
RUN if [ -f "/app/${APP}/requirements.txt" ]; then pip install -r "/app/${APP}/requirements.txt"; fi

# The policy the gate reads (SAGAQ_POLICY_FILE); replace it with your own.
ARG POLICY=tasks/policy.yaml
COPY ${POLICY} /app/policy.yaml

# Never root: a step runs whatever code your sagas import.
RUN useradd --create-home --uid 10001 --user-group sagaq
USER sagaq

CMD ["sagaq", "worker"]
