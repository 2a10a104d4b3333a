"""
The usage page in a real browser: headless Chromium signs in with Basic
auth to a running C{twistd -n openai-proxy} after real traffic on named
keys, reads the keys table, and takes screenshots (desktop and phone
widths) into a temporary folder it prints.

Run by CI as its own step (C{.ci/run}, which installs Debian's C{chromium}):

    BROWSER_TESTS=1 python -m twisted.trial tests.browser

C{BROWSER_ARTIFACTS=DIR} keeps the screenshots in C{DIR}; C{CHROMIUM=PATH}
names the browser when it is not C{chromium} on the PATH.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.fake_upstream import FakeOpenAI
from tests.harness import JSON, client
from tests.test_keys import ADMIN, ALICE, BOB, KEYS_TOML, SERVER_KEYS, chat, keys_file
from tests.test_operations import start_twistd


def _chromium() -> str | None:
    named = os.environ.get("CHROMIUM")
    if named:
        return named
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
if not os.environ.get("BROWSER_TESTS"):
    SKIP: str | None = (
        "browser tests run in their own CI step: set BROWSER_TESTS=1 to run them"
    )
elif CHROMIUM is None:
    SKIP = (
        "Chromium is missing: install Debian's chromium package "
        "(apt-get install chromium) or set CHROMIUM=/path/to/chromium"
    )
else:
    SKIP = None

#: Flags that keep a headless Chromium from reaching for the network (on a
#: closed network it would otherwise hang) or for a sandbox it cannot have
#: as root in a container.
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def browse(url: str, *extra: str) -> str:
    """Run Chromium once on C{url} (a fresh profile); return its stdout."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        done = subprocess.run(
            [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True,
            timeout=90,
            check=True,
        )
    return done.stdout.decode("utf-8", "replace")


def text_of(dom: str) -> str:
    """The text of a page's body, tags dropped and whitespace squeezed."""
    body = dom.split("<body>", 1)[-1]
    body = re.sub(r"<(svg|style)\b.*?</\1>", " ", body, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


class UsagePageInChromiumTests(TestCase):
    skip = SKIP
    timeout = 180

    async def test_an_admin_sees_who_used_what_in_a_browser(self) -> None:
        fake = FakeOpenAI()
        upstream = fake.start(self)
        _, port = await start_twistd(
            self,
            {
                "UPSTREAM": upstream,
                "KEYS_FILE": keys_file(self, KEYS_TOML),
                "OPENAI_KEY": SERVER_KEYS,
                "ADMIN_KEY": ADMIN,
                "TIMEOUT": "2000",
            },
        )
        base = f"http://127.0.0.1:{port}"
        http = client(self)
        codes = []
        for key in (ALICE, ALICE, ALICE, BOB):  # alice's rpm is 2
            response = await http.post(
                base + "/v1/chat/completions",
                json.dumps(chat()).encode(),
                headers={"Authorization": f"Bearer {key}", **JSON},
            )
            await response.content()
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 429, 200])

        signed_in = f"http://admin:{ADMIN}@127.0.0.1:{port}/usage"
        # Without credentials the browser is asked to sign in (headless, it
        # cannot answer): no page.
        unsigned = await deferToThread(browse, base + "/usage", "--dump-dom")
        self.assertNotIn("Tokens per hour", unsigned)

        dom = await deferToThread(browse, signed_in, "--dump-dom")
        table = text_of(dom.split("<table", 1)[1].split("</table>", 1)[0])
        self.assertIn("alice active 2 / 2 (at limit)", table)
        self.assertIn("4 tokens 2 prompt + 2 completion refused: 1 by rpm", table)
        self.assertIn("bob active", table)
        self.assertIn("carol active", table)
        self.assertIn("dave disabled", table)
        self.assertIn("erin expired", table)
        self.assertIn("<svg", dom)
        for secret in (ALICE, BOB, ADMIN):
            self.assertNotIn(secret, dom)

        folder = os.environ.get("BROWSER_ARTIFACTS") or tempfile.mkdtemp(
            prefix="usage-page-"
        )
        os.makedirs(folder, exist_ok=True)
        for name, size in (("desktop", "1280,1400"), ("phone", "390,1800")):
            path = os.path.join(folder, f"usage-{name}.png")
            await deferToThread(
                browse, signed_in, f"--window-size={size}", f"--screenshot={path}"
            )
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
            self.assertGreater(os.path.getsize(path), 10_000)
        print(f"\nusage page screenshots: {folder}", file=sys.stderr)
