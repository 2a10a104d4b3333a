"""
``python -m benchmarks.ws_upstream --port 0``: a fast fake WebSocket upstream
for the ``websocket`` scenario (the websockets package on asyncio; prints
``READY <port>``).  A text message ``burst N SIZE`` is answered with N text
messages of SIZE bytes; ``count N`` waits for N more messages, then answers
``counted``; anything else is echoed.
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, serve


async def _session(ws: ServerConnection) -> None:
    async for message in ws:
        if isinstance(message, str) and message.startswith("burst "):
            _, count, size = message.split()
            payload = (
                '{"type":"response.output_text.delta","delta":"'
                + "x" * max(0, int(size) - 48)
                + '"}'
            )
            for _ in range(int(count)):
                await ws.send(payload)
        elif isinstance(message, str) and message.startswith("count "):
            wanted = int(message.split()[1])
            for _ in range(wanted):
                await ws.recv()
            await ws.send("counted")
        else:
            await ws.send(message)


async def _main(port: int) -> None:
    async with serve(
        _session, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None
    ) as server:
        print("READY", server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_main(parser.parse_args().port))


if __name__ == "__main__":
    main()
