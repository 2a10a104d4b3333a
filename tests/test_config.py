"""Settings: precedence, defaults, and errors that name the setting."""

from __future__ import annotations

import os
import subprocess

from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from openai_proxy import config as config_module
from openai_proxy.config import Config, ConfigError
from openai_proxy.ops.startup import summary
from openai_proxy.tap import Options
from tests.harness import TWISTD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigTests(TestCase):
    def test_defaults(self) -> None:
        config = Config.load({}, {})
        self.assertEqual(config.listen, ("tcp:9000",))
        self.assertEqual(config.upstream, "https://api.openai.com")
        self.assertEqual(config.routes, (("fk", "https://openai.api2d.net"),))
        self.assertEqual(config.timeout, 30.0)
        self.assertEqual(config.max_body, 52428800)
        self.assertEqual(config.cors_origins, ("*",))
        self.assertFalse(config.open_proxy)

    def test_node_project_variables(self) -> None:
        config = Config.load(
            {},
            {
                "PORT": "8080",
                "PROXY_KEY": "a,b",
                "OPENAI_KEY": "sk-1",
                "TIMEOUT": "1500",
            },
        )
        self.assertEqual(config.listen, ("tcp:8080",))
        self.assertEqual(config.proxy_keys, ("a", "b"))
        self.assertEqual(config.openai_keys, ("sk-1",))
        self.assertEqual(config.timeout, 1.5)

    def test_option_wins_over_environment(self) -> None:
        options = Options()
        os_env = {"TIMEOUT": "1000", "UPSTREAM": "http://env.example"}
        self.patch(os, "environ", os_env)
        options.parseOptions(
            [
                "--timeout",
                "2000",
                "--listen",
                "tcp:1234",
                "--route",
                "x=http://r.example",
            ]
        )
        config = options["config"]
        self.assertEqual((config.timeout, config.upstream), (2.0, "http://env.example"))
        self.assertEqual(config.listen, ("tcp:1234",))
        self.assertEqual(config.routes[-1], ("x", "http://r.example"))

    def test_keys_from_files(self) -> None:
        path = FilePath(self.mktemp())
        path.setContent(b"# proxy keys\npk-1\npk-2, pk-3\n")
        config = Config.load({"proxy-key-file": path.path}, {})
        self.assertEqual(config.proxy_keys, ("pk-1", "pk-2", "pk-3"))

    def test_keys_are_hidden_from_repr(self) -> None:
        config = Config.load({}, {"PROXY_KEY": "pk-secret", "OPENAI_KEY": "sk-secret"})
        self.assertNotIn("secret", repr(config))

    def test_bad_values_name_the_setting(self) -> None:
        cases = {
            "TIMEOUT": {"TIMEOUT": "soon"},
            "MAX_BODY": {"MAX_BODY": "-1"},
            "UPSTREAM": {"UPSTREAM": "ftp://x"},
            "ROUTES": {"ROUTES": "nourl"},
            "PORT": {"PORT": "99999"},
            "OPEN_PROXY": {"OPEN_PROXY": "maybe"},
            "MODERATION": {"MODERATION": "sometimes"},
        }
        for setting, env in cases.items():
            with self.assertRaises(ConfigError) as e:
                Config.load({}, env)
            self.assertIn(setting, str(e.exception), setting)

    def test_server_key_without_proxy_key_refuses_to_start(self) -> None:
        with self.assertRaises(ConfigError) as e:
            Config.load({}, {"OPENAI_KEY": "sk-1"})
        self.assertIn("PROXY_KEY", str(e.exception))
        Config.load({}, {"OPENAI_KEY": "sk-1", "OPEN_PROXY": "1"})
        Config.load({"open": "1"}, {"OPENAI_KEY": "sk-1"})


class WorkersAutoTests(TestCase):
    """WORKERS=auto asks for what suits the machine and the listen."""

    def setUp(self) -> None:
        self.patch(config_module, "available_cpus", lambda: 4)

    def test_auto_is_one_per_cpu_on_tcp(self) -> None:
        config = Config.load({}, {"WORKERS": "auto", "PORT": "tcp:9000"})
        self.assertEqual((config.workers, config.workers_auto), (4, True))

    def test_auto_is_one_process_on_a_listen_that_cannot_be_shared(self) -> None:
        config = Config.load({}, {"WORKERS": "auto", "PORT": "unix:/tmp/p.sock"})
        self.assertEqual((config.workers, config.workers_auto), (1, True))
        self.assertIn("workers 1 (auto)", summary(config))

    def test_a_number_that_cannot_be_shared_is_still_refused(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            Config.load({}, {"WORKERS": "4", "PORT": "unix:/tmp/p.sock"})
        self.assertEqual(caught.exception.setting, "--workers/WORKERS")


class TwistdStartTests(TestCase):
    """The command users run refuses bad settings with a message and a non-zero exit."""

    def test_twistd_refuses_server_key_without_proxy_key(self) -> None:
        env = {**os.environ, "OPENAI_KEY": "sk-never-printed", "PYTHONPATH": REPO}
        env.pop("PROXY_KEY", None)
        run = subprocess.run(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "openai-proxy",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.mktemp_dir(),
        )
        self.assertNotEqual(run.returncode, 0)
        self.assertIn("PROXY_KEY", run.stdout + run.stderr)
        self.assertNotIn("sk-never-printed", run.stdout + run.stderr)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path
