# The SuperLink: Flower's official image, pinned to the Flower version fedsim is tested with.
# It needs nothing of fedsim's (the ServerApp runs in the superexec-serverapp container); the
# image adds only a state folder owned by the image's non-root user `app` (UID 49999), so the
# named volume compose.yml mounts there starts writable and SuperNode registrations survive a
# restart of the SuperLink.
ARG FLWR_VERSION=1.42.0
FROM flwr/superlink:${FLWR_VERSION}

# Numeric ids (hadolint DL3066): 0 is root, 49999 the official images' user `app`.
USER 0
RUN mkdir -p /app/state && chown 49999:49999 /app/state
USER 49999
WORKDIR /app
ENTRYPOINT ["flower-superlink"]
