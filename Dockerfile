# galaxysae: one image for every job (synth, embed, train, sweep, render, ... `galaxysae --help`).
#   docker build -t galaxysae .            (or: make image)
#   docker run --rm --init galaxysae embed --config /data/embed.toml            # CPU
#   docker run --rm --init --gpus all galaxysae embed --config /data/embed.toml # GPU, same image
# torch is the CUDA build from PyPI: it uses a GPU when the container has one and falls back to
# the CPU otherwise, with no flag. KubeRay and Slurm (Apptainer/Pyxis) run `ray start` and
# `galaxysae` from this image too. No secret is baked in: S3/HF credentials come from the
# environment at run time.
FROM python:3.11-slim-bookworm

# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: a Ray node told to stop (SIGTERM: a KubeRay pod
# deleted after its job, `docker stop`) stops at once instead of draining for Ray Serve, which
# after a Ray Data job never finishes and lasts the whole 30 s grace period until SIGKILL.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_DISABLE_USAGE_STATS=1 \
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
    HOME=/home/galaxysae
# No HF_HOME here: the Hub cache is $HOME/.cache/huggingface unless the run sets HF_HOME. Apptainer
# (Slurm) never lets a host variable override one the image sets, so an image HF_HOME would hide
# the user's cache and point the Hub at the read-only image.

# wget: KubeRay's readiness and liveness probes run `wget` inside the Ray containers (operators
# before 1.6, and 1.6+ with older Ray); without it no pod ever becomes Ready.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with a fixed uid (the k8s manifests run as 1000:1000). HOME is set in the image
# and open to every uid (sticky, like /tmp): `docker run --user "$(id -u):$(id -g)"` with a uid the
# image does not know would otherwise get HOME=/, where Ray cannot write its auth token (~/.ray)
# and nothing can write ~/.cache.
RUN groupadd --gid 1000 galaxysae \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash galaxysae \
    && chmod 1777 /home/galaxysae

WORKDIR /opt/galaxysae

# Dependencies first, the jobs' pins (`make setup` adds the test tools of requirements-dev.txt):
# this layer is rebuilt only when the pins change, not when the code does.
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
