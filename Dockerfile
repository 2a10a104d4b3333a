# openai-proxy:
#   docker build -t openai-proxy . && docker run -p 9000:9000 -e PROXY_KEY=... openai-proxy
# The base is a build argument so that the image can be built on any
# Debian-like Python image, e.g. one already in a local registry, or PyPy:
#   docker build --build-arg BASE=pypy:3.11-slim --build-arg PYTHON=pypy3 ...
# PYTHON is the base's interpreter command; it only makes the virtualenv, and
# everything after runs the virtualenv's own `python`.
# deploy/test-image.sh builds this file unmodified and checks what it makes.
ARG BASE=python:3.12-slim

# Build stage: the source and pip's work stay here, out of the final layers.
FROM ${BASE} AS build
ARG PYTHON=python
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /src
# Write Twisted's plugin cache (dropin.cache) now: at run time the non-root
# user cannot, and twistd would log a warning at every start.  Twisted
# rewrites a cache that is not strictly newer than every plugin module, and a
# layer may keep only whole seconds, so the cache is dated 2 s after the
# newest file beside it (a fast build writes both in the same second).
RUN ${PYTHON} -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install /src \
 && /opt/venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/venv/bin/python -c "import os, twisted.plugins as p; d = os.path.dirname(p.__file__); t = int(max(os.stat(os.path.join(d, f)).st_mtime for f in os.listdir(d))) + 2; os.utime(os.path.join(d, 'dropin.cache'), (t, t))"

FROM ${BASE}
# A name and uid that no Debian base has (base-passwd already owns `proxy`).
RUN useradd --system --user-group --uid 10001 --no-create-home \
      --home-dir /tmp --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
# WORKERS=auto: one process per CPU the container may use.  Nothing is written
# at run time outside /tmp (no pid file, no plugin cache, no bytecode).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WORKERS=auto
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /tmp

EXPOSE 9000
# Reads PORT like the proxy does (a number or an endpoint description such
# as tcp:9010:interface=0.0.0.0) and asks /healthz there.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-m", "openai_proxy.ops.healthcheck"]

CMD ["twistd", "-n", "--pidfile=", "openai-proxy"]
