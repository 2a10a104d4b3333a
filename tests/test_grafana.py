"""
deploy/grafana/openai-proxy.json is a well-formed Grafana dashboard, and
every metric its queries name is one the proxy exports (after mixed traffic:
named keys, a 429, a server key benched), so it cannot drift from the code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.fake_upstream import Script
from tests.harness import JSON, RelayTestCase
from tests.test_keys import ADMIN, ALICE, BOB, KEYS_TOML, SERVER_KEYS, chat, keys_file

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy/grafana/openai-proxy.json"
_METRIC = re.compile(r"\bopenai_proxy_[a-z_]+\b")


def dashboard() -> Any:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(board: Any) -> Iterator[Any]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for name, value in node.items():
            yield name, value
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def queried_metrics(board: Any) -> set[str]:
    names: set[str] = set()
    for name, value in walk(board):
        if name in ("expr", "query", "definition") and isinstance(value, str):
            names.update(_METRIC.findall(value))
    return names


class DashboardShapeTests(SynchronousTestCase):
    def test_a_current_schema_a_datasource_variable_and_no_fixed_uids(self) -> None:
        board = dashboard()
        self.assertGreaterEqual(board["schemaVersion"], 39)
        variables = {v["name"]: v for v in board["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        self.assertNotIn("uid", board)
        uids = {value for name, value in walk(board) if name == "uid"}
        self.assertEqual(uids, {"${datasource}", "-- Grafana --"})

    def test_every_panel_queries_the_chosen_datasource(self) -> None:
        ids = set()
        drawn = [p for p in panels(dashboard()) if p["type"] != "row"]
        self.assertGreater(len(drawn), 10)
        for panel in drawn:
            ids.add(panel["id"])
            self.assertEqual(panel["datasource"]["uid"], "${datasource}", panel)
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"]["uid"], "${datasource}")
                self.assertTrue(_METRIC.search(target["expr"]), panel["title"])
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24)
        self.assertEqual(len(ids), len(drawn), "panel ids are unique")


class DashboardDriftTests(RelayTestCase):
    def setUp(self) -> None:
        self.env = {
            "KEYS_FILE": keys_file(self, KEYS_TOML),
            "OPENAI_KEY": SERVER_KEYS,
            "ADMIN_KEY": ADMIN,
            "TIMEOUT": "2000",
        }
        super().setUp()

    async def test_every_metric_the_dashboard_queries_is_exported(self) -> None:
        self.fake.by_key["sk-server-one"] = Script(status=401, body=b"{}")
        for key, payload in [
            (ALICE, chat()),
            (ALICE, chat(stream=True)),
            (ALICE, chat()),  # over alice's rpm: a 429
            (BOB, chat()),
            ("pk-wrong", chat()),
        ]:
            response = await self.http.post(
                self.url("/v1/chat/completions"),
                json.dumps(payload).encode(),
                headers={"Authorization": f"Bearer {key}", **JSON},
            )
            await response.content()
        await (await self.http.get(self.url("/healthz"))).content()
        text = (await (await self.http.get(self.url("/metrics"))).content()).decode()
        exported = {
            line.split("{")[0].split(" ")[0]
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        # A labelled series with no child yet (no WebSocket session closed
        # in this traffic, say) is declared by its TYPE line alone.
        suffixes = {"histogram": ("_bucket", "_sum", "_count")}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                exported.update(name + end for end in suffixes.get(kind, ("",)))
        self.assertIn("openai_proxy_upstream_key_benched_total", exported)
        self.assertIn("openai_proxy_rate_limited_total", exported)
        queried = queried_metrics(dashboard())
        self.assertGreater(len(queried), 15)
        self.assertEqual(sorted(queried - exported), [])
