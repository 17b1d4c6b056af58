# The DICOM mail gateway as a container image. Build: `docker build -t dicom-mail-gateway .` (or podman/buildah).
# BASE may be any Debian bookworm image with Python 3.11 (tests/test_deployment.py builds on a Debian rootfs).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# GnuPG for @GIT PGP/MIME partners; python3-venv only where the base image lacks it (Debian's own python3)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gnupg \
 && (python3 -c "import ensurepip" 2>/dev/null || apt-get install -y --no-install-recommends python3-venv) \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home /var/lib/dicom-mail-gateway gateway
WORKDIR /opt/dicom-mail-gateway
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python3 -m venv /opt/dicom-mail-gateway/.venv \
 && /opt/dicom-mail-gateway/.venv/bin/pip install --no-cache-dir . \
 && ln -s /opt/dicom-mail-gateway/.venv/bin/dicom-mail-gateway /usr/local/bin/dicom-mail-gateway
COPY contrib/docker/entrypoint.sh /usr/local/bin/dmg-entrypoint
VOLUME ["/data/d", "/data/e", "/etc/dicom-mail-gateway"]
EXPOSE 11112
# starts as root only to make the volumes writable for the user gateway (uid 10001), then runs as that user
ENTRYPOINT ["dmg-entrypoint"]
CMD ["run", "-c", "/etc/dicom-mail-gateway/gateway.toml"]
