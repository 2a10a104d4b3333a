"""
What choosing the upstream by model costs: the choice itself measured in
this process (reading the model from a chat body, then the upstreams of a
20-entry C{UPSTREAMS_FILE} that serve it), and the proxy's CPU per request
with such a file next to none, non-streamed and streamed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import timeit
from pathlib import Path
from typing import Any

from benchmarks import probes, procs
from benchmarks.limits import _dumped
from benchmarks.scenarios import EVENTS, Harness, _throughput
from benchmarks.wrk import CHAT, CHAT_STREAM

#: Upstreams in the file; the bench model is served by the last one only, so
#: each choice looks at all of them.
ENTRIES = 20


def upstreams_file(port: int, entries: int = ENTRIES) -> str:
    """A file of C{entries} upstreams; only the last serves C{gpt-bench}."""
    text = []
    for number in range(entries - 1):
        text.append(
            f'[[upstreams]]\nname = "u{number}"\n'
            f'base_url = "http://127.0.0.1:{port}"\n'
            f'models = ["model-{number}-*", "other-{number}"]\nkeys = ["sk-u{number}"]\n'
        )
    text.append(
        f'[[upstreams]]\nname = "bench"\nbase_url = "http://127.0.0.1:{port}"\n'
        'models = ["gpt-bench*"]\nkeys = ["sk-bench"]\n'
    )
    return "\n".join(text)


def _per_call_us(statement: Any, number: int = 20000) -> float:
    best = min(timeit.repeat(statement, number=number, repeat=5))
    return round(best / number * 1e6, 2)


def choice_in_process() -> dict[str, Any]:
    """Microseconds per request the choice costs, measured in this process."""
    from openai_proxy.bodies import _for_model
    from openai_proxy.upstream.channels import parse_upstreams
    from openai_proxy.upstream.choose import UpstreamRegistry

    registry = UpstreamRegistry(None, parse_upstreams(upstreams_file(1), {}))
    assert [c.name for c in registry.plan(["gpt-bench"])] == ["bench"]

    def read_model() -> tuple[str, ...]:
        return _for_model(CHAT)[1]

    def choose() -> object:
        return registry.plan(read_model())

    return {
        "entries": ENTRIES,
        "read_model_us": _per_call_us(read_model),
        "plan_us": _per_call_us(lambda: registry.plan(("gpt-bench",))),
        "choice_us": _per_call_us(choose),
    }


def instructions(h: Harness, path: Path) -> dict[str, Any]:
    """
    User-space instructions per non-streamed request under callgrind, with
    the file and without: a figure other work on the machine does not move.
    """
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        return {"skipped": "valgrind is not installed (apt-get install valgrind)"}
    count = 100 if h.settings.quick else 300
    raw = probes.request_bytes(CHAT)
    result: dict[str, Any] = {"requests": count}
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        work = Path(tmp)
        for name, env in (
            ("no_file", {}),
            ("file_of_20", {"UPSTREAMS_FILE": str(path)}),
        ):
            out = work / name
            wrapper = (valgrind, "--tool=callgrind", "--instr-atstart=no")
            wrapper += (f"--callgrind-out-file={out}.%p",)
            proxy = procs.start_proxy(
                h.upstream_port, 1, wrapper=wrapper, start_limit=180, **env
            )
            try:
                conn = probes.Connection(proxy.port)
                for _ in range(50):  # warm-up, not counted
                    conn.exchange(raw)
                pid = str(proxy.proc.pid)
                for step in (["-i", "on"], None, ["-d"], ["-i", "off"]):
                    if step is None:
                        for _ in range(count):
                            conn.exchange(raw)
                        continue
                    subprocess.run(
                        [control, *step, pid], check=True, capture_output=True
                    )
                conn.close()
            finally:
                procs.stop(proxy.proc)
            result[name] = _dumped(work, name) // count
    result["added"] = result["file_of_20"] - result["no_file"]
    result["added_share"] = round(result["added"] / result["no_file"], 4)
    return result


def by_model(h: Harness) -> dict[str, Any]:
    """
    The choice in process, instructions per request under callgrind, and
    proxy CPU per request with a 20-entry C{UPSTREAMS_FILE} against none
    (non-streamed and streamed).
    """
    result: dict[str, Any] = {"in_process": choice_in_process()}
    with tempfile.TemporaryDirectory(prefix="bench-upstreams-") as tmp:
        path = Path(tmp) / "upstreams.toml"
        path.write_text(upstreams_file(h.upstream_port))
        result["instructions_per_request"] = instructions(h, path)
        for name, body, units in (
            ("non_stream", CHAT, 1),
            ("stream", CHAT_STREAM, EVENTS + 1),
        ):
            # Alternated, twice, the lower CPU of each kept: a shared
            # machine's noise comes in bursts.
            runs: dict[str, list[dict[str, Any]]] = {"no_file": [], "file_of_20": []}
            for _ in range(2):
                runs["no_file"].append(_throughput(h, body, units, direct_port=0))
                runs["file_of_20"].append(
                    _throughput(
                        h,
                        body,
                        units,
                        start=lambda: h.proxy(UPSTREAMS_FILE=str(path)),
                        direct_port=0,
                    )
                )
            best = {
                kind: min(
                    (r["proxy"] for r in results),
                    key=lambda p: float(p["proxy_cpu_us_per_request"]),
                )
                for kind, results in runs.items()
            }
            none, twenty = best["no_file"], best["file_of_20"]
            result[name] = {
                **best,
                "added_cpu_us_per_request": round(
                    twenty["proxy_cpu_us_per_request"]
                    - none["proxy_cpu_us_per_request"],
                    1,
                ),
                "added_p50_us": round((twenty["p50_ms"] - none["p50_ms"]) * 1000),
            }
    return result
