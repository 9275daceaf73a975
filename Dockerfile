# A hospital's secure aggregation peer (TensorFlow CPU), run as a non-root user.
#
#   docker build -t hospital-peer .
#   docker run --rm -v "$PWD/kit-hospital-a:/kit:ro" -v peer-a:/var/lib/peer \
#       -p 7443:7443 hospital-peer                      # peer start (the default)
#   docker run --rm -v ... hospital-peer doctor         # peer doctor
#
# The kit (made by `ceremony kit`) is mounted read-only at /kit; the data and ledger
# databases live on a volume at /var/lib/peer. The entrypoint, deploy/peer-site, checks both
# mounts and says what is wrong before the peer starts. See README, "Deploying a site".
#
# Offline builds: wheels put in deploy/container/wheels/ (`pip wheel . -w
# deploy/container/wheels`) are installed instead of downloading from PyPI.
ARG BASE=python:3.11-slim

# --------------------------------------------------------------------------- builder
FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY deploy/container/wheels/ /wheels/
COPY pyproject.toml setup.py README.md ./
COPY secagg ./secagg
COPY peer ./peer
COPY dashboard ./dashboard
COPY scripts ./scripts
# pip is removed from the venv at the end: the peer never installs anything at run time.
RUN python3 -m venv /opt/peer \
    && if ls /wheels/*.whl >/dev/null 2>&1; then \
           /opt/peer/bin/pip install --no-index --find-links /wheels hospital-secagg; \
       else \
           /opt/peer/bin/pip install /src; \
       fi \
    && /opt/peer/bin/pip uninstall --yes pip \
    && /opt/peer/bin/peer --help >/dev/null

# --------------------------------------------------------------------------- runtime
FROM ${BASE}
RUN groupadd --gid 10001 peer \
    && useradd --uid 10001 --gid peer --home-dir /var/lib/peer --no-create-home \
        --shell /usr/sbin/nologin peer \
    && mkdir -p /kit /var/lib/peer \
    && chown peer:peer /var/lib/peer \
    && chmod 0700 /var/lib/peer
COPY --from=builder /opt/peer /opt/peer
COPY deploy/peer-site /usr/local/bin/peer-site
ENV PATH=/opt/peer/bin:$PATH \
    HOME=/var/lib/peer \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PEER_KIT=/kit \
    PEER_STATE=/var/lib/peer
USER 10001:10001
WORKDIR /var/lib/peer
VOLUME ["/var/lib/peer"]
EXPOSE 7443
ENTRYPOINT ["/usr/local/bin/peer-site"]
CMD ["start"]
