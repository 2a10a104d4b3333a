"""
The command users run, C{twistd openai-proxy}, as a child process: its
--help and --version, its one-line refusal of bad settings, and the one
line it logs at start-up.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from importlib.metadata import version
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from openai_proxy.config import Config
from openai_proxy.ops.startup import summary
from openai_proxy.tap import ENVIRONMENT_ONLY, BadSettings, Options
from tests.harness import TWISTD
from tests.test_migration import expected_backlog, free_port, kernel_backlogs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Settings that could leak into a child from the test's own environment.
_OURS = re.compile(
    r"^(PORT|ROUTES|WORKERS|TENCENT_.*|.*_KEY.*|MODERATION.*|OPEN_PROXY)$"
)


def clean_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _OURS.match(k)}
    env.update(PYTHONPATH=REPO, **settings)
    return env


class _Recorder(dict[str, str]):
    """An empty environment that notes every variable asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


def environment_variables() -> set[str]:
    """Every environment variable the settings are read from."""
    env = _Recorder()
    Config.load({}, env)
    return env.asked


class CommandLineTests(TestCase):
    _help: subprocess.CompletedProcess[str] | None = None

    def help(self) -> subprocess.CompletedProcess[str]:
        # One run serves every test of the help text.
        if CommandLineTests._help is None:
            CommandLineTests._help = self.run_twistd("openai-proxy", "--help")
        return CommandLineTests._help

    def run_twistd(
        self, *args: str, **settings: str
    ) -> subprocess.CompletedProcess[str]:
        cwd = self.mktemp()
        os.makedirs(cwd)
        return subprocess.run(
            [*TWISTD, *args],
            env=clean_env(**settings),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
        )

    def test_help_names_every_environment_variable(self) -> None:
        run = self.help()
        self.assertEqual(run.returncode, 0, run.stderr)
        text = " ".join(run.stdout.split())  # undo the wrapping
        names = environment_variables()
        # The recorder must have seen the settings the issue names.
        self.assertLessEqual(
            {
                "PORT",
                "ROUTES",
                "OPEN_PROXY",
                "PROXY_KEY_FILE",
                "OPENAI_KEY_FILE",
                "TENCENT_CLOUD_SID",
                "TENCENT_CLOUD_SKEY",
                "LOG_BODIES",
                "METRICS_KEY",
            },
            names,
        )
        for name in sorted(names):
            if name.endswith("_proxy"):
                # https_proxy and friends: documented with the upper-case form.
                name = name.upper()
            self.assertRegex(text, rf"\[{name}, default [^\]]+\]", name)

    def test_help_states_every_default_one_way(self) -> None:
        run = self.help()
        text = " ".join(run.stdout.split("Options:", 1)[1].split())
        brackets = re.findall(r"\[[^\]]*\]", text)
        odd = [b for b in brackets if not re.fullmatch(r"\[[A-Z_]+, default .+\]", b)]
        self.assertEqual(odd, [])
        self.assertNotIn("(default", text)
        # One bracket per option (but --help/--version) and per env-only setting.
        options = len(re.findall(r"^\s+--", run.stdout, re.M)) - 2
        self.assertEqual(len(brackets), options + len(ENVIRONMENT_ONLY))

    def test_environment_only_lines_start_with_the_variable(self) -> None:
        run = self.help()
        tail = run.stdout.split("from the environment only:", 1)[1]
        starts = [line.split()[0] for line in tail.splitlines() if line[2:3].strip()]
        self.assertEqual(starts, [env for env, _, _ in ENVIRONMENT_ONLY])

    def test_help_says_what_a_bare_port_number_listens_on(self) -> None:
        text = " ".join(self.help().stdout.split())
        self.assertIn("PORT=N means tcp:N:backlog=1024", text)

    def test_version_is_the_packages_own(self) -> None:
        run = self.run_twistd("openai-proxy", "--version")
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(run.stdout, f"openai-proxy {version('openai-proxy')}\n")

    def assert_one_line_error(
        self, run: subprocess.CompletedProcess[str], *expected: str
    ) -> None:
        self.assertNotEqual(run.returncode, 0)
        self.assertNotIn("Options:", run.stdout + run.stderr)
        first = run.stderr.splitlines()[0]
        self.assertTrue(first.startswith("twistd openai-proxy: "), run.stderr)
        for text in expected:
            self.assertIn(text, first)

    def test_options_raise_bad_settings_naming_the_setting(self) -> None:
        self.patch(os, "environ", {"GRACE": "-1"})
        with self.assertRaises(BadSettings) as e:
            Options().parseOptions([])
        self.assertTrue(e.exception.message.startswith("--grace/GRACE: "))
        self.assertNotEqual(e.exception.code, 0)

    def test_bad_setting_is_one_line_without_the_usage_text(self) -> None:
        run = self.run_twistd("-n", "--pidfile=", "openai-proxy", TIMEOUT="soon")
        self.assert_one_line_error(run, "TIMEOUT", "'soon'")

    def test_bad_option_is_one_line_too(self) -> None:
        run = self.run_twistd("-n", "--pidfile=", "openai-proxy", "--no-such-thing")
        self.assert_one_line_error(run, "--no-such-thing")

    def test_half_a_tencent_credential_refuses_to_start(self) -> None:
        run = self.run_twistd(
            "-n", "--pidfile=", "openai-proxy", TENCENT_CLOUD_SKEY="skey-never-shown"
        )
        self.assert_one_line_error(run, "TENCENT_CLOUD_SID")
        self.assertNotIn("skey-never-shown", run.stdout + run.stderr)


class _Twistd(ProcessProtocol):
    """A running twistd: its output so far, and Deferreds for what it says."""

    def __init__(self) -> None:
        self.output = ""
        self.ended: Deferred[None] = Deferred()
        self._waiting: list[tuple[re.Pattern[str], Deferred[None]]] = []

    def said(self, pattern: str) -> Deferred[None]:
        """Fires once the output matches C{pattern}."""
        d: Deferred[None] = Deferred()
        self._waiting.append((re.compile(pattern), d))
        self._check()
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for item in list(self._waiting):
            pattern, d = item
            if pattern.search(self.output):
                self._waiting.remove(item)
                d.callback(None)

    def processEnded(self, reason: Failure) -> None:
        for pattern, d in self._waiting:
            d.errback(AssertionError(f"twistd ended before {pattern.pattern!r}"))
        self._waiting = []
        self.ended.callback(None)


class StartupLineTests(TestCase):
    timeout = 60

    def start(self, env: Mapping[str, str]) -> _Twistd:
        cwd = self.mktemp()
        os.makedirs(cwd)
        twistd = _Twistd()
        process = reactor.spawnProcess(
            twistd,
            sys.executable,
            [*TWISTD, "-n", "--pidfile=", "openai-proxy"],
            env=dict(env),
            path=cwd,
        )

        def stop() -> Deferred[None] | None:
            if twistd.ended.called:
                return None
            process.signalProcess(signal.SIGTERM)
            return twistd.ended

        self.addCleanup(stop)
        return twistd

    async def test_one_line_says_what_is_active_once_per_start(self) -> None:
        port = free_port()
        twistd = self.start(
            clean_env(
                PORT=str(port),
                UPSTREAM="http://127.0.0.1:1/v1",
                ROUTES="xx=https://xx.example:8443/base",
                PROXY_KEY="pk-never-shown-1,pk-never-shown-2",
                OPENAI_KEY="sk-never-shown",
                WORKERS="2",
                MODERATION_BACKEND="openai",
                MODERATION_LEVEL="high",
            )
        )
        await twistd.said(r"openai-proxy \S+: listen")
        await twistd.said(r"worker pid \d+ serving")
        lines = [line for line in twistd.output.splitlines() if ": listen " in line]
        self.assertEqual(len(lines), 1, twistd.output)
        line = lines[0]
        for part in (
            f"listen tcp:{port}:backlog=",
            "upstream 127.0.0.1:1;",
            "routes fk→openai.api2d.net, xx→xx.example:8443;",
            "keys: 2 proxy keys, 1 server key;",
            "moderation: openai, mode request, level high",
            "workers 2",
        ):
            self.assertIn(part, line)
        self.assertNotIn("never-shown", twistd.output)
        self.assertNotIn("/base", line)
        # The PORT number's listen got the default backlog, in both workers.
        self.assertEqual(kernel_backlogs(port), [expected_backlog()] * 2)

    async def test_open_proxy_and_clients_own_keys_are_named(self) -> None:
        port = free_port()
        twistd = self.start(
            clean_env(PORT=f"tcp:{port}:interface=127.0.0.1", ROUTES="none")
        )
        await twistd.said(r"openai-proxy \S+: listen")
        line = next(x for x in twistd.output.splitlines() if ": listen " in x)
        self.assertIn("routes none;", line)
        self.assertIn("keys: open (no proxy key), clients' own OpenAI keys;", line)
        self.assertIn("moderation: no backend", line)
        self.assertIn("workers 1", line)


class SummaryTests(TestCase):
    """The start-up line counts named keys and says where limits are kept."""

    def keys_file(self) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                '[[keys]]\nname = "alice"\nkey = "pk-alice-never-shown"\nrpm = 5\n'
                '[[keys]]\nname = "bob"\nkey = "pk-bob-never-shown"\n'
            )
        return path

    def test_named_keys_are_counted_and_limits_said_to_be_per_process(self) -> None:
        config = Config.load({}, {"KEYS_FILE": self.keys_file()})
        line = summary(config)
        self.assertIn("keys: 2 named keys, clients' own OpenAI keys;", line)
        self.assertTrue(line.endswith("; limits per process"), line)
        self.assertNotIn("never-shown", line)

    def test_limits_in_redis_and_proxy_keys_beside_named_ones(self) -> None:
        config = Config.load(
            {},
            {
                "KEYS_FILE": self.keys_file(),
                "PROXY_KEY": "pk-plain-never-shown",
                "REDIS_URL": "redis://127.0.0.1:1/0",
            },
        )
        line = summary(config)
        self.assertIn("keys: 1 proxy key + 2 named keys,", line)
        self.assertTrue(line.endswith("; limits in redis"), line)
