# openai-proxy: docker build -t openai-proxy . && docker run -p 9000:9000 -e PROXY_KEY=... openai-proxy
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY . /src
# Install, then write Twisted's plugin cache while we are still root: at run
# time the non-root user could not, and would log a warning at every start.
RUN pip install /src \
 && rm -rf /src \
 && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin proxy
USER proxy
WORKDIR /tmp

EXPOSE 9000
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '9000'), timeout=2)"

CMD ["twistd", "-n", "--pidfile=", "openai-proxy"]
