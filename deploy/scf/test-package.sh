#!/usr/bin/env bash
# Prove the Tencent SCF web-function package, as root on Linux:
#   1. build the zip (deploy/scf/build.sh) and check scf_bootstrap in it;
#   2. unpack it into a clean directory with unzip, as SCF does;
#   3. run its scf_bootstrap the way SCF would: the code at /var/user,
#      read-only; the interpreter path /var/lang/pythonXY/bin/pythonX.Y
#      mapped to a plain CPython X.Y of this machine whose site-packages is
#      hidden (an empty directory), the whole file system read-only but a
#      fresh /tmp, and an environment holding only the function's variables
#      (a private mount namespace, so nothing of this shows outside);
#   4. check /healthz, a chat stream relayed to a fake upstream, that
#      nothing tried to write (plugin cache, pid file), and SIGTERM.
# Each check prints PASS or FAIL; exits non-zero on any failure.  PYTHON
# names a Python with the project's test extras (twisted, openai) that runs
# pip, the fake upstream and the client; default python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
version="${SCF_PYTHON_VERSION:-3.10}"
short="${version/./}"
host_python="${PYTHON:-python3}"
# Not under /var: the function gets a /var of its own.
work="$(mktemp -d /tmp/openai-proxy-scf.XXXXXX)"
grace=5
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

failures=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}

if [ "$(id -u)" != 0 ]; then
  echo "deploy/scf/test-package.sh must run as root (mount namespaces)" >&2
  exit 2
fi
command -v unzip >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq unzip >/dev/null
}
target_python="$(deploy/scf/find-python "$version")"
prefix="$("$target_python" -I -c 'import sys; print(sys.base_prefix)')"
echo "plain Python $version for /var/lang/python$short: $prefix"

# -- 1. build ---------------------------------------------------------------------
PYTHON="$host_python" deploy/scf/build.sh "$version" "$work/package.zip"
mkdir "$work/code"
unzip -q "$work/package.zip" -d "$work/code"
bootstrap="$work/code/scf_bootstrap"
if [ -x "$bootstrap" ]; then pass "scf_bootstrap is executable"; else fail "scf_bootstrap is executable"; fi
if [ "$(head -1 "$bootstrap")" = "#!/bin/bash" ]; then pass "scf_bootstrap starts with #!/bin/bash"; else fail "scf_bootstrap starts with #!/bin/bash"; fi
if grep -q $'\r' "$bootstrap"; then fail "scf_bootstrap has LF line endings only"; else pass "scf_bootstrap has LF line endings only"; fi
if grep -q "exec /var/lang/python$short/bin/python$version " "$bootstrap"; then
  pass "scf_bootstrap runs /var/lang/python$short/bin/python$version"
else
  fail "scf_bootstrap runs /var/lang/python$short/bin/python$version"
fi
if [ -s "$work/code/twisted/plugins/dropin.cache" ]; then pass "the plugin cache is in the package"; else fail "the plugin cache is in the package"; fi

# -- 2. run -----------------------------------------------------------------------
fake_log="$work/fake.log"
PYTHONPATH="$repo" "$host_python" -m tests.serve_fake_upstream >"$fake_log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$fake_log" ] && break; sleep 0.1; done
upstream="$(head -1 "$fake_log")"
port="$("$host_python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
proxy_key="proxy-key-$RANDOM$RANDOM"
log="$work/function.log"

# SCF listens on 9000; here PORT picks a free port, as this machine is shared.
unshare --mount --propagation private bash -euc '
  work=$1 prefix=$2 short=$3 version=$4
  mount -t tmpfs -o mode=755 tmpfs /var
  mkdir -p "/var/lang/python$short" /var/user
  mount --bind "$prefix" "/var/lang/python$short"
  mount -t tmpfs -o mode=755 tmpfs "/var/lang/python$short/lib/python$version/site-packages"
  mount --bind "$work/code" /var/user
  mount -o remount,bind,ro /var/user
  mount -o remount,bind,ro "/var/lang/python$short"
  mount -o remount,ro /var
  mount -o remount,bind,ro /
  mount -t tmpfs -o mode=1777 tmpfs /tmp
  cd /var/user
  exec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/tmp LANG=C.UTF-8 \
    PORT="$5" UPSTREAM="$6" PROXY_KEY="$7" OPENAI_KEY=sk-upstream-test GRACE="$8" \
    /var/user/scf_bootstrap
' bash "$work" "$prefix" "$short" "$version" "$port" "$upstream" "$proxy_key" "$grace" >"$log" 2>&1 &
function_pid=$!
pids+=("$function_pid")

base_url="http://127.0.0.1:$port"
up() { "$host_python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
started=$SECONDS
for _ in $(seq 300); do
  up "$base_url/healthz" && break
  kill -0 "$function_pid" 2>/dev/null || break
  sleep 0.1
done
if up "$base_url/healthz"; then
  pass "/healthz answers 200 (started in about $((SECONDS - started)) s)"
else
  fail "/healthz answers 200"
fi
if ss -Hltn "sport = :$port" | grep -qE '(0\.0\.0\.0|\*|\[::\]):'"$port"; then
  pass "listens on all interfaces"
else
  fail "listens on all interfaces: $(ss -Hltn "sport = :$port")"
fi
if PYTHONPATH="$repo" "$host_python" -m tests.check_stream "$base_url" "$proxy_key"; then
  pass "a chat stream relays through the function to the fake upstream"
else
  fail "a chat stream relays through the function to the fake upstream"
fi
kill -TERM "$function_pid" 2>/dev/null || echo "the function had already exited"
deadline=$((SECONDS + grace))
while kill -0 "$function_pid" 2>/dev/null && [ "$SECONDS" -le "$deadline" ]; do sleep 0.1; done
if kill -0 "$function_pid" 2>/dev/null; then
  fail "SIGTERM: still running after GRACE=$grace s"
else
  pass "SIGTERM: exited within GRACE=$grace s"
fi
if ! grep -q "openai-proxy\|ProxySite starting" "$log"; then
  fail "the function started"
elif grep -qiE "Unable to write|Read-only file system|Permission denied|Traceback" "$log"; then
  fail "nothing tried to write outside /tmp, and no tracebacks:"
  grep -iE -B2 -A5 "Unable to write|Read-only file system|Permission denied|Traceback" "$log" | head -40
else
  pass "nothing tried to write outside /tmp, and no tracebacks"
fi
echo "function log:"
sed 's/^/    /' "$log" | head -30

echo
if [ "$failures" = 0 ]; then echo "SCF package proof: all checks passed"; else echo "SCF package proof: $failures check(s) failed"; fi
[ "$failures" = 0 ]
