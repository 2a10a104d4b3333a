"""openai-proxy: a streaming relay for the OpenAI HTTP API, on Twisted."""
