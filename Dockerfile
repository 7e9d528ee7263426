# The operator's image: `docker build -t secured-endpoint-operator:0.1.0 .` (or `make image` without a registry).
#
# BASE is any Debian-based image with a python3 (3.11+) on its PATH and apt: the official slim image by
# default, or the local Debian one `make image` builds. Every stage starts from the same BASE, so the
# virtualenv copied from the builder finds its interpreter at the same path in the runtime stage.
ARG BASE=docker.io/library/python:3.11.13-slim-bookworm

# The run-time dependencies of the two distributions, as requirements: only the lines of
# [project].dependencies, without the operator's dependency on the gateway library (built from gateway/).
FROM ${BASE} AS requirements
COPY pyproject.toml /src/
COPY gateway/pyproject.toml /src/gateway/
RUN python3 -c 'import sys, tomllib; print(*(d for f in sys.argv[1:] for d in tomllib.load(open(f, "rb"))["project"]["dependencies"]), sep="\n")' \
        /src/pyproject.toml /src/gateway/pyproject.toml | grep -v '^secured-endpoint-' >/requirements.txt

FROM ${BASE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# gcc builds twofish (pyjks) from its sdist. The official image brings ensurepip and Python.h with its
# interpreter; Debian's python3 has them in python3-venv and python3-dev.
RUN set -eu; \
    packages="gcc libc6-dev"; \
    python3 -c 'import ensurepip' 2>/dev/null || packages="$packages python3-venv"; \
    include="$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')"; \
    [ -f "$include/Python.h" ] || packages="$packages python3-dev"; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -m venv /opt/build
# pip's network settings, for this stage only (a package mirror, the CA of a TLS-inspecting proxy):
# unset unless given with --build-arg.
ARG PIP_INDEX_URL
ARG PIP_CERT
# The dependencies' wheels first, so that a change to the sources builds only the project's own two wheels,
# and one to pyproject.toml that leaves the dependencies alone (tools, extras) rebuilds nothing. The pip
# cache (with the compiled twofish) stays in the build cache, not in a layer.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/build/bin/pip wheel --use-pep517 --wheel-dir /wheels --requirement /tmp/requirements.txt
# .dockerignore lets through only pyproject.toml, README.md, operator/ and gateway/.
COPY . /src/
# The runtime virtualenv holds only what those wheels install (no pip, no setuptools), compiled now since
# the root filesystem is read-only at run time; unchecked-hash .pyc files are used as they are, whatever the
# sources' timestamps after COPY. javaobj-py3 0.6.1 ships javaobj/v3/beans.py in Python 3.12 syntax; pyjks
# imports only javaobj (v1).
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/build/bin/pip wheel --use-pep517 --no-deps --wheel-dir /wheels /src /src/gateway \
 && python3 -m venv --without-pip /opt/venv \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-index --no-compile --find-links /wheels \
        secured-endpoint-operator secured-endpoint-gateway \
 && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        -x '/javaobj/v3/beans\.py$' /opt/venv/lib

FROM ${BASE}
COPY --from=builder /opt/venv /opt/venv
# A passwd/group entry for 65532: libraries ask who they run as (getpass, expanduser); containerd, unlike
# podman --user, adds none.
RUN echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'nonroot:x:65532:' >> /etc/group
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/nonexistent
# Numeric, so that runAsNonRoot can be verified without reading the passwd entry.
USER 65532:65532
ENTRYPOINT ["secured-endpoint-operator"]
CMD ["run", "--all-namespaces"]
# Last, so that a new revision rebuilds nothing else. (make image sets version and revision with --label:
# the layer cache of buildah 1.28, in podman 4.3, reuses a LABEL step whatever value its ARG has.)
ARG BASE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="secured-endpoint-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps fresh OAuth 2.0 access tokens in Secrets and Redis for API gateways" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
