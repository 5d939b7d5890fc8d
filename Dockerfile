# galaxysae: one image for every job (synth, embed, train, sweep, render, ... `galaxysae --help`).
#   docker build -t galaxysae .            (or: make image)
#   docker run --rm galaxysae embed --config /data/embed.toml            # CPU
#   docker run --rm --gpus all galaxysae embed --config /data/embed.toml # GPU, same image
# torch is the CUDA build from PyPI: it uses a GPU when the container has one and falls back to
# the CPU otherwise, with no flag. KubeRay and Slurm (Apptainer/Pyxis) run `ray start` and
# `galaxysae` from this image too. No secret is baked in: S3/HF credentials come from the
# environment at run time.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_DISABLE_USAGE_STATS=1 \
    HF_HOME=/home/galaxysae/.cache/huggingface

# A non-root user with a fixed uid (the k8s manifests run as 1000:1000).
RUN groupadd --gid 1000 galaxysae \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash galaxysae

WORKDIR /opt/galaxysae

# Dependencies first, from the same pins as `make setup`: this layer is rebuilt only when the
# pins change, not when the code does.
COPY requirements.txt requirements.lock ./
RUN python -m pip install -r requirements.txt -c requirements.lock

# Then the code (a small layer).
COPY pyproject.toml README.md ./
COPY galaxysae ./galaxysae
COPY jobs ./jobs
COPY configs ./configs
RUN python -m pip install --no-deps --no-build-isolation . \
    && galaxysae --help >/dev/null

USER 1000:1000
WORKDIR /home/galaxysae
ENTRYPOINT ["galaxysae"]
CMD ["--help"]
