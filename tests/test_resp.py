"""
The small Redis client (openai_proxy.keys.resp): RESP parsing and encoding, and
the client against a real redis-server (scripts, errors, a lost Redis).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from openai_proxy.keys.resp import (
    INCOMPLETE,
    RedisClient,
    RedisError,
    RedisUnavailable,
    Reply,
    Script,
    bulk,
    encode,
    parse,
)
from tests.redis_server import SKIP, RedisServer, make_tls_files

_REPLIES: list[tuple[bytes, Reply]] = [
    (b"+OK\r\n", b"OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhe\r\nl\r\n", b"he\r\nl"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n$1\r\na\r\n:7\r\n*2\r\n+x\r\n$-1\r\n", [b"a", 7, [b"x", None]]),
]


class ParseTests(SynchronousTestCase):
    def test_every_reply_kind(self) -> None:
        for raw, expected in _REPLIES:
            self.assertEqual(parse(raw + b"+next\r\n"), (expected, len(raw)))

    def test_an_error_reply_is_returned_not_raised(self) -> None:
        reply, end = parse(b"-NOSCRIPT No matching script\r\n")
        assert isinstance(reply, RedisError)
        self.assertEqual(str(reply), "NOSCRIPT No matching script")

    def test_a_reply_cut_anywhere_is_incomplete(self) -> None:
        for raw, _ in _REPLIES:
            for cut in range(len(raw)):
                self.assertEqual(parse(raw[:cut]), (None, INCOMPLETE))

    def test_what_is_not_resp_is_refused(self) -> None:
        self.assertRaises(ValueError, parse, b"HTTP/1.1 200 OK\r\n")


class EncodeTests(SynchronousTestCase):
    def test_arguments_are_bulk_strings(self) -> None:
        self.assertEqual(
            encode([b"SET", "ké", 12]),
            b"*3\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$2\r\n12\r\n",
        )

    def test_a_script_head_and_its_tail_make_one_evalsha(self) -> None:
        script = Script("return 1")
        whole = encode([b"EVALSHA", script.sha, 2, "k1", "k2", "a", 5, "ticket"])
        head = script.head(["k1", "k2"], ["a", 5], 1)
        self.assertEqual(head + bulk("ticket"), whole)


class _Silent(Protocol):
    """Takes every command, answers none."""


class _AnswersOnce(Protocol):
    """Answers the first command (the client's PING on connecting), then none."""

    answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            assert self.transport is not None
            self.transport.write(b"+PONG\r\n")


class ClientTests(TestCase):
    skip = SKIP

    async def client(self, url: str, **options: Any) -> RedisClient:
        client = RedisClient(url, reactor, **options)
        client.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(client.stop()))
        return client

    def logged_why(self, needle: str) -> Deferred[str]:
        """Fires with the first logged C{why} field, from now on, holding C{needle}."""
        found: Deferred[str] = Deferred()

        def observe(event: dict[str, Any]) -> None:
            text = str(event.get("why", ""))
            if needle in text and not found.called:
                found.callback(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return found

    async def test_commands_and_replies_in_order(self) -> None:
        redis = await RedisServer.start(self)
        client = await self.client(redis.url)
        await client.when_up()
        sent = [client.call("SET", "k", "v"), client.call("GET", "k")]
        sent.append(client.call("GET", "missing"))
        self.assertEqual([await d for d in sent], [b"OK", b"v", None])

    async def test_an_error_reply_fails_the_call(self) -> None:
        redis = await RedisServer.start(self)
        client = await self.client(redis.url)
        await client.when_up()
        with self.assertRaises(RedisError):
            await client.call("NOSUCHCOMMAND")
        self.assertEqual(await client.call("PING"), b"PONG")

    async def test_a_script_redis_forgot_is_loaded_again(self) -> None:
        redis = await RedisServer.start(self)
        script = Script("return redis.call('INCR', KEYS[1])")
        client = await self.client(redis.url, scripts=[script])
        await client.when_up()
        await client.call("SCRIPT", "FLUSH")
        first: Deferred[Reply] = Deferred()
        second: Deferred[Reply] = Deferred()
        command = script.head(["counter"], [], 0)
        self.assertTrue(client.evalsha(script, command, first.callback))
        self.assertTrue(client.evalsha(script, command, second.callback))
        self.assertEqual([await first, await second], [1, 2])

    async def test_not_connected_fails_at_once(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        address = f"redis://127.0.0.1:{port.getHost().port}/0"
        await port.stopListening()  # nothing listens there now
        client = await self.client(address)
        with self.assertRaises(RedisUnavailable):
            await client.call("PING")
        self.assertFalse(client.evalsha(Script("return 1"), b"", print))

    async def test_a_redis_that_stops_answering_fails_what_waits(self) -> None:
        port = reactor.listenTCP(
            0, Factory.forProtocol(_AnswersOnce), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client = await self.client(
            f"redis://127.0.0.1:{port.getHost().port}/0", timeout=0.1
        )
        await client.when_up()
        replies: list[Reply] = []
        client.evalsha(Script("return 1"), b"*1\r\n$4\r\nPING\r\n", replies.append)
        with self.assertRaises(RedisUnavailable):
            await client.call("PING")
        self.assertIsInstance(replies[0], RedisError)

    async def test_a_lost_redis_fails_what_waits_and_comes_back(self) -> None:
        redis = await RedisServer.start(self)
        client = await self.client(redis.url)
        await client.when_up()
        blocked = client.call("BLPOP", "never", "0")  # waits until the end
        await redis.stop()
        with self.assertRaises(RedisUnavailable):
            await blocked
        self.assertFalse(client.up)

    async def test_a_password_in_the_url_and_a_refused_one(self) -> None:
        redis = await RedisServer.start(self, "--requirepass", "s3cr:et")
        good = await self.client(f"redis://:s3cr%3Aet@127.0.0.1:{redis.port}/2")
        await good.when_up()
        self.assertEqual(await good.call("SET", "k", "v"), b"OK")
        refused = self.logged_why("refused AUTH")
        bad = await self.client(f"redis://default:wrong@127.0.0.1:{redis.port}/0")
        self.assertIn("WRONGPASS", await refused)
        self.assertNotIn("wrong", (await refused).replace("WRONGPASS", ""))
        self.assertFalse(bad.up)

    async def test_rediss_checks_the_certificate_against_trusted_cas(self) -> None:
        tls = make_tls_files(self.mktemp())
        redis = await RedisServer.start(self, tls=tls)
        refused = self.logged_why("cannot connect")
        # OpenSSL reads SSL_CERT_FILE for its trusted CAs at each connection.
        self.addCleanup(_restore_env, "SSL_CERT_FILE", os.environ.get("SSL_CERT_FILE"))
        os.environ["SSL_CERT_FILE"] = tls.cert  # a certificate, but not the CA
        untrusted = await self.client(redis.url)
        self.assertIn("certificate verify failed", await refused)
        self.assertFalse(untrusted.up)
        os.environ["SSL_CERT_FILE"] = tls.ca
        trusted = await self.client(redis.url)
        await trusted.when_up()
        self.assertEqual(await trusted.call("PING"), b"PONG")


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _resp(reply: Reply) -> bytes:
    # The test's own encoder of replies, independent of the client's.
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, RedisError):
        return b"-" + str(reply).encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(_resp(item) for item in reply)


_reply_trees = st.recursive(
    st.none() | st.integers() | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


class ParsePropertyTests(SynchronousTestCase):
    @given(st.lists(_reply_trees, min_size=1, max_size=5), st.data())
    def test_replies_split_anywhere_parse_back_the_same(
        self, replies: list[Reply], data: st.DataObject
    ) -> None:
        stream = b"".join(_resp(r) for r in replies)
        cuts = sorted(
            data.draw(st.lists(st.integers(0, len(stream)), max_size=6), "cuts")
        )
        # Fed as the socket might deliver it: parse what is complete,
        # keep the rest for the next piece.
        got: list[Reply] = []
        buffer = b""
        for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            buffer += stream[start:stop]
            pos = 0
            while pos < len(buffer):
                reply, end = parse(buffer, pos)
                if end == INCOMPLETE:
                    break
                got.append(reply)
                pos = end
            buffer = buffer[pos:]
        self.assertEqual(got, replies)
        self.assertEqual(buffer, b"")

    @given(st.binary(max_size=200))
    def test_any_bytes_parse_or_are_refused_cleanly(self, raw: bytes) -> None:
        try:
            parse(raw)
        except ValueError:
            pass
