"""
Stream a chat completion through a running proxy with the official openai
SDK and exit 0 when it relays L{FakeOpenAI}'s default stream whole, else 1.
For the deployment proofs under deploy/:

    python -m tests.check_stream http://127.0.0.1:9000 PROXY_KEY
"""

from __future__ import annotations

import sys

from openai import APIError, OpenAI

#: What FakeOpenAI streams for any chat completion request.
EXPECTED = "Hello world!"


def main(argv: list[str]) -> int:
    base_url, api_key = argv
    client = OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="gpt-fake",
            messages=[{"role": "user", "content": "Say hello"}],
            stream=True,
            timeout=10,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    except APIError as e:
        print(f"the stream failed: {e!r}")
        return 1
    text = "".join(pieces)
    if len(pieces) < 2 or text != EXPECTED:
        print(f"expected {EXPECTED!r} in several chunks, got {pieces!r}")
        return 1
    print(f"streamed {text!r} in {len(pieces)} chunks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
