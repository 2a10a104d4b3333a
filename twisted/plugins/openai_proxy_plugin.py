"""twistd dropin: ``twistd -n openai-proxy`` (kept trivial; see openai_proxy.tap)."""

from twisted.application.service import ServiceMaker

openaiProxy = ServiceMaker(
    "OpenAI proxy",
    "openai_proxy.tap",
    "A streaming relay for the OpenAI HTTP API.",
    "openai-proxy",
)
