# The pneumo worker image: the project (library + flows) installed, run as a
# non-root user. One image serves three roles:
#   * the compose stack's Prefect worker (default CMD: a process worker polling
#     pneumo-process; flow runs execute inside this container and its GPUs),
#   * the flow-run container of the Docker pool pneumo-gpu-docker and the pod
#     of the Kubernetes pool pneumo-gpu-k8s (the worker replaces CMD with
#     `prefect flow-run execute`, which is why this is a CMD, not an ENTRYPOINT),
#   * a Dask scheduler or GPU worker (`dask scheduler`, `dask worker ...`).
#
# Build from the repository root (compose does this):
#   docker build -f docker/worker.Dockerfile -t pneumo-worker:0.1.0-gpu .
#   docker build -f docker/worker.Dockerfile --build-arg VARIANT=cpu -t pneumo-worker:0.1.0-cpu .

FROM python:3.11.13-slim-bookworm

# gpu: TensorFlow with its CUDA libraries (the project's `gpu` extra);
# cpu: tensorflow-cpu from the base requirements, for laptops and CI.
ARG VARIANT=gpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PNEUMO_REPO_DIR=/opt/pneumo \
    PNEUMO_HOME=/var/lib/pneumo \
    TF_CPP_MIN_LOG_LEVEL=2 \
    TF_FORCE_GPU_ALLOW_GROWTH=true

RUN groupadd --system --gid 10001 pneumo \
    && useradd --system --uid 10001 --gid pneumo --home-dir /home/pneumo --create-home pneumo \
    && install -d -o pneumo -g pneumo /var/lib/pneumo /home/pneumo/.keras

WORKDIR /opt/pneumo

# Dependencies first, from pyproject.toml alone (empty package stubs stand in
# for the code), so that code edits do not rebuild the multi-GB layer.
COPY pyproject.toml README.md ./

# The `gpu` extra adds tensorflow[and-cuda] next to the base tensorflow-cpu;
# both wheels write the same `tensorflow/` package, so the CPU wheel is removed
# and the CUDA build reinstalled over it. The build fails here, not at the
# first training run, if the result is not a CUDA build.
RUN set -eux; \
    case "$VARIANT" in \
      gpu) extras="gpu,dask" ;; \
      cpu) extras="dask" ;; \
      *) echo "VARIANT must be 'gpu' or 'cpu', got '$VARIANT'" >&2; exit 2 ;; \
    esac; \
    mkdir -p pneumo flows; touch pneumo/__init__.py flows/__init__.py; \
    pip install ".[${extras}]"; \
    pip uninstall -y pneumo; \
    if [ "$VARIANT" = gpu ]; then \
      tf_version="$(python -c 'import importlib.metadata as m; print(m.version("tensorflow"))')"; \
      pip uninstall -y tensorflow-cpu; \
      pip install --force-reinstall --no-deps "tensorflow==${tf_version}"; \
      python -c 'import tensorflow as tf; assert tf.test.is_built_with_cuda(), "not a CUDA build"'; \
    fi; \
    rm -rf pneumo flows build *.egg-info

COPY pneumo ./pneumo
COPY flows ./flows
RUN pip install --no-deps . \
    && rm -rf build *.egg-info \
    && python -c 'import pneumo, flows, prefect, mlflow, distributed'

# Deployment files: prefect.yaml for `prefect deploy` inside the container and
# the work-pool templates for `prefect worker start --base-job-template`.
COPY prefect.yaml ./
COPY deployments ./deployments

USER pneumo

# Prefect worker health server (only with --with-healthcheck), Dask ports.
EXPOSE 8080 8786 8787

CMD ["prefect", "worker", "start", \
     "--pool", "pneumo-process", "--type", "process", \
     "--base-job-template", "/opt/pneumo/deployments/process.json", \
     "--limit", "2", "--with-healthcheck"]
