"""
``python -m benchmarks [--quick] [--scenario NAME]... [--workers N] [--streams N] [--seed APP_JS]``

Starts a fake upstream and the proxy (``twistd -n --pidfile= openai-proxy``,
a fresh one per scenario, on the interpreter running the benchmarks),
measures, prints a table and writes ``benchmarks/results/latest.json``.
Needs ``wrk`` for the throughput scenarios (``apt-get install wrk``).
``--seed`` runs the Node original too (``node``; its ``npm install`` done)
and prints the proxy's figures divided by its own, from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from typing import Any

from benchmarks import interpreter, procs, report
from benchmarks.scenarios import SCENARIOS, Harness, Settings
from openai_proxy.cpus import available_cpus


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import twisted

    return {
        "cpus": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "cpu_model": model,
        "python": platform.python_version(),
        "interpreter": interpreter.describe(),
        "twisted": twisted.__version__,
        "kernel": platform.release(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="short runs, for a smoke test"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable); default all",
    )
    parser.add_argument("--workers", type=int, default=1, help="proxy worker processes")
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="concurrent streams for many-streams (default 1000; 200 with --quick)",
    )
    parser.add_argument(
        "--seed",
        metavar="APP_JS",
        help="the Node original's app.js (dependencies installed): adds its "
        "rows and the proxy ÷ seed ratios",
    )
    parser.add_argument("--output", default=str(procs.RESULTS / "latest.json"))
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    if args.seed and "seed" not in names:
        names.append("seed")
    count = args.streams or (200 if args.quick else 1000)
    settings = Settings(
        quick=args.quick, workers=args.workers, streams=count, seed=args.seed
    )
    print("interpreter:", interpreter.summary(interpreter.describe()), flush=True)
    procs.raise_nofile(3 * count + 1000)
    # ^C and SIGTERM end the run through atexit, which kills the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    harness = Harness(settings)
    results: dict[str, Any] = {}
    started = time.time()
    try:
        for name in names:
            print(f"-- {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                results[name] = SCENARIOS[name](harness)
            except Exception as e:
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            results[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
    finally:
        harness.close()
    report.add_seed_ratios(results)
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": _machine(),
        "settings": {
            "quick": args.quick,
            "workers": args.workers,
            "streams": count,
            "seed": args.seed,
        },
        "results": results,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(document, f, indent=2)
    print()
    print("interpreter:", interpreter.summary(document["machine"]["interpreter"]))
    report.table(results)
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
