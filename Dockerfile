# syntax=docker/dockerfile:1.7
# foldserve images, one multi-stage build:
#   gpu    the service on onnxruntime-gpu (the default target: the last stage)
#   cpu    the same service on plain onnxruntime
#   train  torch and the training extra, for `foldserve train`, `export` and `run`
# Every version comes from constraints.txt; this file names only the base image.
#
# GPU: onnxruntime-gpu 1.31.1 is built with CUDA 13.0 and cuDNN 9, and its `cuda` and `cudnn`
# extras name NVIDIA's CUDA 13 / cuDNN 9 wheels. constraints.txt pins those wheels at CUDA 13.0
# (runtime 13.0.96, cuBLAS 13.1) and cuDNN 9.20.0.48: exactly the set PyTorch 2.13.0's CUDA
# build requires, so a GPU trainer and the GPU server share one CUDA user space, and inside
# onnxruntime-gpu's own ranges (CUDA ~=13.0, cuDNN ~=9.0). They are the whole CUDA user space the
# CUDA execution provider loads; the host provides only the driver (>= 580, CUDA 13.0's minimum)
# through the NVIDIA Container Toolkit. Chosen over an nvidia/cuda runtime base image so that both
# serving images share one Python (3.11, the one tested), and every CUDA/cuDNN version is pinned
# in constraints.txt like everything else instead of a second time in a base image's tag.
# onnxruntime and onnxruntime-gpu both provide `onnxruntime`: each image installs exactly one.

ARG PYTHON_IMAGE=python:3.11-slim

# ----------------------------------------------------------------- shared by every target
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can be chowned.
RUN groupadd --system --gid 10001 foldserve \
 && useradd --system --uid 10001 --gid foldserve --create-home --home-dir /home/foldserve \
        --shell /usr/sbin/nologin foldserve
WORKDIR /src

# ----------------------------------------------------------------- dependency lists
# Read from pyproject.toml alone, so dependency layers are rebuilt only when it or the pins change.
FROM base AS requirements
COPY pyproject.toml constraints.txt deploy/docker/requirements.py ./
RUN python requirements.py pyproject.toml serve cpu gpu train

# ----------------------------------------------------------------- the project's wheels
# The serving wheel is built without training/ in the tree, so it cannot contain it.
FROM base AS wheel-serve
ENV PIP_CONSTRAINT=/src/constraints.txt
COPY pyproject.toml README.md MANIFEST.in constraints.txt ./
COPY foldserve foldserve
COPY service service
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM wheel-serve AS wheel-train
COPY training training
RUN rm -rf /wheels && pip wheel --no-deps --wheel-dir /wheels .

# ----------------------------------------------------------------- serving dependencies
FROM base AS deps-cpu
COPY --from=requirements /src/constraints.txt /src/requirements-serve.txt /src/requirements-cpu.txt ./
RUN python -m venv /opt/venv \
 && pip install -c constraints.txt -r requirements-serve.txt -r requirements-cpu.txt

FROM base AS deps-gpu
# `cuda,cudnn`: NVIDIA's CUDA 13 and cuDNN 9 wheels (about 2 GB). Empty leaves them out: an
# image that starts and serves on the CPU provider, which is how it is tested on machines
# without a GPU (scripts/image-test.sh); never ship that one for GPUs.
ARG ORT_GPU_EXTRAS=cuda,cudnn
COPY --from=requirements /src/constraints.txt /src/requirements-serve.txt /src/requirements-gpu.txt ./
RUN python -m venv /opt/venv \
 && pip install -c constraints.txt -r requirements-serve.txt -r requirements-gpu.txt \
        ${ORT_GPU_EXTRAS:+"onnxruntime-gpu[${ORT_GPU_EXTRAS}]"}

# ----------------------------------------------------------------- what both serving images share
FROM base AS runtime
COPY deploy/docker/healthcheck.py /usr/local/lib/foldserve/healthcheck.py
ENV FOLDSERVE_HOST=0.0.0.0 \
    FOLDSERVE_PORT=8000 \
    FOLDSERVE_REPOSITORY=/models
WORKDIR /home/foldserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/lib/foldserve/healthcheck.py"]
# Exec form: the server is PID 1 and gets SIGTERM itself, which it turns into a drain
# (service/shutdown.py). Stop timeouts must exceed FOLDSERVE_SHUTDOWN_GRACE_S + the longest request.
STOPSIGNAL SIGTERM
CMD ["foldserve", "serve"]

# ----------------------------------------------------------------- cpu
FROM runtime AS cpu
COPY --from=deps-cpu /opt/venv /opt/venv
# COPY, not a bind mount: its checksum keys the layer cache, so a new wheel is always installed.
COPY --from=wheel-serve /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
# The repository shipped with the image; mount a volume on /models to serve another.
COPY --chown=10001:10001 models /models
USER 10001:10001

# ----------------------------------------------------------------- train
FROM base AS train
# torch==2.13.0 (constraints.txt): from deploy/wheels/ when a wheel is there (`make image-test`
# puts this machine's CPU build there: 2.13.0+cpu sorts above 2.13.0, so pip takes it), else
# from the index, where PyPI's Linux torch is the CUDA build, several GB. For a CPU trainer
# without a local wheel: --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=
COPY --from=requirements /src/constraints.txt /src/requirements-train.txt ./
RUN --mount=type=bind,source=deploy/wheels,target=/tmp/local-wheels \
    python -m venv /opt/venv \
 && pip install --find-links /tmp/local-wheels -c constraints.txt -r requirements-train.txt
COPY --from=wheel-train /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY deploy/docker/load_model.py /usr/local/lib/foldserve/load_model.py
COPY deploy/docker/train-job.sh /usr/local/bin/foldserve-train-job
# Mount points owned by the user, so fresh named volumes on them are writable by it.
RUN install -d -o 10001 -g 10001 /models /runs
ENV FOLDSERVE_REPOSITORY=/models
WORKDIR /home/foldserve
USER 10001:10001
CMD ["foldserve", "--help"]

# ----------------------------------------------------------------- gpu (the default target)
FROM runtime AS gpu
# Where NVIDIA's wheels put CUDA 13 (consolidated under nvidia/cu13) and cuDNN 9: the CUDA
# provider's libraries find them here without a system CUDA.
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cu13/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=deps-gpu /opt/venv /opt/venv
# COPY, not a bind mount: its checksum keys the layer cache, so a new wheel is always installed.
COPY --from=wheel-serve /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
COPY --chown=10001:10001 models /models
USER 10001:10001
