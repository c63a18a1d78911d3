# The SuperExec: Flower's official image plus fedsim. In Flower 1.42 one `flower-superexec` runs
# whatever task its Runtime API hands it (the ServerApp via flwr-serverapp when pointed at the
# SuperLink, ClientApps via flwr-clientapp when pointed at a SuperNode; --plugin-type is deprecated
# and ignored), so one image serves both roles and the app and its dependencies live here.
# Build context: the repository root (compose.yml sets it); superexec.Dockerfile.dockerignore
# keeps the context to what the install needs.
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

ARG TORCH_VERSION=2.13.0
WORKDIR /app

# The CPU build of torch first, from PyTorch's CPU index: installing fedsim without it would pull
# the multi-GB CUDA build from PyPI. pip then finds torch==2.13.0 satisfied.
RUN python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
    "torch==${TORCH_VERSION}"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedsim ./fedsim
COPY --chown=app:app models ./models
COPY --chown=app:app attacks ./attacks
COPY --chown=app:app audits ./audits
# fedsim and its dependencies (flwr stays at the image's pinned version: pyproject allows 1.42.x).
# /app/runs is where the ServerApp writes its run folders (compose.yml mounts a volume there).
RUN python -m pip install --no-cache-dir . \
    && python -c "import fedsim, torch; assert torch.__version__.startswith('${TORCH_VERSION}')" \
    && mkdir -p /app/runs

# Dependencies are baked in; flower-superexec installs none per run unless given
# --allow-runtime-dependency-installation, which compose.yml does not pass.
ENTRYPOINT ["flower-superexec"]
