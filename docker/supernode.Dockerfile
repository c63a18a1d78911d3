# A SuperNode: Flower's official image, pinned to the Flower version fedsim is tested with. It needs
# nothing of fedsim's: its ClientApps run in its superexec-clientapp container, and its partition
# comes from --node-config in compose.yml. Kept as a Dockerfile so the version is pinned here, once
# for the SuperNodes, and compose builds every service the same way.
ARG FLWR_VERSION=1.42.0
FROM flwr/supernode:${FLWR_VERSION}

# The base image already runs as its non-root user `app` (UID 49999).
WORKDIR /app
ENTRYPOINT ["flower-supernode"]
