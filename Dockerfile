# The cifar_assets code location: Dagster user code plus the project, for docker-compose (code
# server, webserver, daemon, mlflow, cifar-metrics all run this image) and for Dagster's Helm
# chart (dagster-user-deployments and the K8sRunLauncher's run pods).
#   docker build -t cifar-assets:latest .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home \
    CIFAR_VAR_DIR=/var/lib/cifar \
    CIFAR_PROGRESS_BAR=0

WORKDIR /app
# Dependencies first, so a code change rebuilds only the last layers.
COPY pyproject.toml README.md ./
RUN mkdir cifar_assets && touch cifar_assets/__init__.py \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
       "dagster-k8s==0.29.27" "dagster-docker==0.29.27" \
    && pip uninstall -y cifar-assets && rm -rf cifar_assets

COPY cifar_assets ./cifar_assets
COPY configs ./configs
COPY triton_repo ./triton_repo
COPY workspace.yaml ./
RUN pip install --no-deps . \
    && useradd --uid 10001 --create-home cifar \
    && mkdir -p "$DAGSTER_HOME" "$CIFAR_VAR_DIR" \
    && cp configs/stack/dagster.yaml "$DAGSTER_HOME/dagster.yaml" \
    && chown -R cifar "$DAGSTER_HOME" "$CIFAR_VAR_DIR"

USER cifar
EXPOSE 4000
# gRPC code server; other services override the command.
CMD ["dagster", "code-server", "start", "-m", "cifar_assets.definitions", \
     "--location-name", "cifar_assets", "-h", "0.0.0.0", "-p", "4000"]
