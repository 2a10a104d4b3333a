#!/usr/bin/env bash
# Build the Tencent Cloud SCF web-function package: a zip holding
# scf_bootstrap, the proxy and all its dependencies as wheels for SCF's Linux
# x86_64 CPython (manylinux2014), its Twisted plugin cache, and bytecode.
#
#   deploy/scf/build.sh [PYTHON_VERSION [OUTPUT.zip]]
#
# PYTHON_VERSION defaults to 3.10, the newest Python of SCF's standard web
# functions; OUTPUT defaults to deploy/scf/dist/openai-proxy-scf-pyXY.zip.
# Needs pip (any Python 3, $PYTHON or python3) and PyPI.  When an interpreter
# of PYTHON_VERSION is found here (deploy/scf/find-python), it writes the
# plugin cache and compiles the bytecode; without one the package still
# works, but starts slower and twistd logs that it cannot write its cache.
set -euo pipefail
cd "$(dirname "$0")/../.."

version="${1:-3.10}"
short="${version/./}"
out="${2:-deploy/scf/dist/openai-proxy-scf-py$short.zip}"
build_python="${PYTHON:-python3}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
code="$stage/code"

echo "building the SCF package for Python $version into $out"
"$build_python" -m pip wheel --quiet --no-deps --wheel-dir "$stage/wheel" .
# pip judges environment markers (`tomli; python_version < "3.11"`) by the
# Python running it, not by --python-version: name what the target needs.
extra=()
if "$build_python" -c 'import sys; v = tuple(map(int, sys.argv[1].split("."))); sys.exit(v >= (3, 11))' "$version"; then
  extra+=("tomli>=1.1")
fi
"$build_python" -m pip install --quiet --no-compile --target "$code" \
  --platform manylinux2014_x86_64 --implementation cp --python-version "$version" \
  --only-binary=:all: "$stage"/wheel/*.whl "${extra[@]}"
# Console scripts name this machine's interpreter: useless there.
rm -rf "$code/bin"
sed "s|/var/lang/python310/bin/python3.10|/var/lang/python$short/bin/python$version|" \
  deploy/scf/scf_bootstrap >"$code/scf_bootstrap"
chmod 755 "$code/scf_bootstrap"

# One modification time for every file, so that the zip is the same for the
# same inputs; the plugin cache gets a later one, as Twisted rewrites a cache
# that is not strictly newer than every plugin (zip keeps 2-second times).
stamp="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"
find "$code" -exec touch -h -d "@$stamp" {} +

if target_python="$(deploy/scf/find-python "$version")"; then
  # -I: nothing from this machine's site-packages or environment.
  "$target_python" -I -B -c \
    "import sys; sys.path.insert(0, sys.argv[1]); from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    "$code"
  test -s "$code/twisted/plugins/dropin.cache"
  # SCF sets PYTHONDONTWRITEBYTECODE, so bytecode is only ever what we ship;
  # unchecked-hash: valid whatever the files' times become when unpacked.
  "$target_python" -I -m compileall -q -j 0 --invalidation-mode unchecked-hash "$code" >/dev/null
  touch -h -d "@$((stamp + 10))" "$code/twisted/plugins/dropin.cache"
else
  echo "warning: no Python $version here: no plugin cache or bytecode in the package" >&2
fi

mkdir -p "$(dirname "$out")"
"$build_python" - "$code" "$out" <<'PY'
import os, sys, zipfile
code, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out + ".partial", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
    for folder, dirs, files in os.walk(code):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            archive.write(path, os.path.relpath(path, code))  # keeps the mode bits
os.replace(out + ".partial", out)
PY
echo "$out: $(du -h "$out" | cut -f1)"
