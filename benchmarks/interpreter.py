"""Which Python runs the proxy, and whether it is an optimised build."""

from __future__ import annotations

import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any


def _var(name: str) -> str:
    value = sysconfig.get_config_var(name)
    return value if isinstance(value, str) else ""


def _debian() -> bool:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return False
    return any(line in text for line in ("ID=debian", "ID=ubuntu", "ID_LIKE=debian"))


def describe() -> dict[str, Any]:
    """
    The interpreter running this process (the benchmarks start the proxy
    with the same one): implementation, version, path and whether it was
    built with PGO and/or LTO, as far as C{sysconfig} tells.
    """
    impl = platform.python_implementation()
    info: dict[str, Any] = {
        "implementation": impl,
        "version": platform.python_version(),
        "executable": sys.executable,
    }
    if impl == "PyPy":
        pypy = getattr(sys, "pypy_version_info", None)
        info["pypy"] = ".".join(map(str, pypy[:3])) if pypy else None
        info["optimised"] = "JIT"
        return info
    args = _var("CONFIG_ARGS")
    flags = " ".join(
        [args, _var("PY_CFLAGS"), _var("PY_CFLAGS_NODIST"), _var("PY_LDFLAGS_NODIST")]
    )
    pgo = "--enable-optimizations" in args
    lto = "--with-lto" in args or "-flto" in flags
    if pgo or lto:
        info["optimised"] = (
            "yes (" + "+".join(n for n, on in (("PGO", pgo), ("LTO", lto)) if on) + ")"
        )
    elif sys.base_prefix == "/usr" and _debian():
        # Debian builds CPython with PGO+LTO on amd64 but strips the flags
        # from its sysconfig data: they cannot be read back here.
        info["optimised"] = "yes, probably (Debian's build; flags not recorded)"
    else:
        info["optimised"] = "no (neither PGO nor LTO in sysconfig)"
    return info


def summary(info: dict[str, Any]) -> str:
    """One line for the report."""
    name = f"{info['implementation']} {info['version']}"
    if info.get("pypy"):
        name += f" (PyPy {info['pypy']})"
    return f"{name} at {info['executable']}; optimised build: {info['optimised']}"
