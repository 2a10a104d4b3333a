#!/usr/bin/env bash
# Prove the Dockerfile on a Debian machine, as root, where no container
# engine can start containers:
#   1. install podman and debootstrap with apt when they are missing;
#   2. make a stand-in for python:3.12-slim from Debian packages (bookworm
#      minbase + python3, python3-venv, `python`), cached as a tarball in
#      $OPENAI_PROXY_CACHE (default /var/cache/openai-proxy);
#   3. build the unmodified Dockerfile on it (only BASE swapped);
#   4. run the image's own CMD as its USER with its ENV and WORKDIR, chrooted
#      into its root filesystem, and check /healthz, the image's HEALTHCHECK
#      (serving, stopped, and with PORT=tcp:N:interface=0.0.0.0), a chat
#      stream relayed to a fake upstream, that nothing is written outside
#      /tmp, and that SIGTERM exits within GRACE.
# Each check prints PASS or FAIL; the exit status is the number of failures
# (non-zero on any).  PYTHON names a Python with the project's test extras
# (twisted, openai), which runs the fake upstream and the client on the
# host; default: python3.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

cache="${OPENAI_PROXY_CACHE:-/var/cache/openai-proxy}"
base_tar="$cache/standin-python-bookworm-v1.tar"
base_image=localhost/openai-proxy-standin:bookworm-v1
image=localhost/openai-proxy:test-image
host_python="${PYTHON:-python3}"
work="$(mktemp -d /var/tmp/openai-proxy-image.XXXXXX)"
grace=5
trap 'rm -rf --one-file-system "$work"' EXIT

failures=0
pass() { echo "PASS: $*"; }
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
}
say() { echo "--- $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "deploy/test-image.sh must run as root (debootstrap, podman, chroot)" >&2
  exit 2
fi
if ! PYTHONPATH="$repo" "$host_python" -c "import twisted, openai, tests.fake_upstream" 2>/dev/null; then
  echo "PYTHON=$host_python cannot import twisted and openai: install '.[test]' into it" >&2
  exit 2
fi

# -- 1. tools -------------------------------------------------------------------
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# -- 2. the stand-in base ---------------------------------------------------------
if ! podman image exists "$base_image"; then
  if [ ! -s "$base_tar" ]; then
    mirror="$(deploy/debian-mirror)"
    say "debootstrap bookworm minbase from $mirror (once per machine; cached in $cache)"
    rootfs="$work/standin"
    debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
      tail -20 "$work/debootstrap.log"
      exit 1
    }
    # Like python:*-slim: pip may install into the system Python.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    # TLS to the package registries may be re-signed by a local CA that only
    # the host trusts: give the build the host's bundle.
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    mkdir -p "$cache"
    tar -C "$rootfs" -cf "$base_tar.partial" . && mv "$base_tar.partial" "$base_tar"
    rm -rf --one-file-system "$rootfs"
  fi
  say "importing the stand-in base $base_image"
  podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$base_tar" "$base_image" >/dev/null
fi

# -- 3. build ---------------------------------------------------------------------
say "podman build (Dockerfile unmodified, BASE=$base_image)"
# --format docker keeps HEALTHCHECK, which the OCI image format has no field for.
if ! podman build --isolation=chroot --pull=never --format=docker \
  --build-arg "BASE=$base_image" -t "$image" -f Dockerfile . >"$work/build.log" 2>&1; then
  tail -30 "$work/build.log"
  fail "the Dockerfile builds"
  exit 1
fi
pass "the Dockerfile builds on the stand-in base"
# Earlier builds of the tag and the build stage: only disk space by now.
podman image prune -f >/dev/null 2>&1 || true

# The image's root filesystem, and its USER, ENV, WORKDIR, CMD and HEALTHCHECK
# as the image records them (nothing here is assumed about the Dockerfile).
root="$work/rootfs"
mkdir "$root"
container="$(podman create "$image")"
podman export "$container" | tar -C "$root" -xf -
podman rm "$container" >/dev/null 2>&1 || true
podman image inspect "$image" >"$work/inspect.json"
eval "$("$host_python" - "$work/inspect.json" "$root" <<'PY'
import json, shlex, sys
[image] = json.load(open(sys.argv[1]))
config = image.get("Config") or {}
health = image.get("HealthCheck") or image.get("Healthcheck") or config.get("Healthcheck") or {}
test = health.get("Test") or []
if test[:1] == ["CMD-SHELL"]:
    test = ["/bin/sh", "-c", test[1]]
elif test[:1] == ["CMD"]:
    test = test[1:]
else:
    test = []
user = config.get("User") or "0"
name, _, group = user.partition(":")
def lookup(table, key):
    if key.isdigit():
        return key
    for line in open(f"{sys.argv[2]}/etc/{table}"):
        fields = line.split(":")
        if fields[0] == key:
            return fields[2] if table == "group" else fields[2]
    raise SystemExit(f"no {table} entry {key!r} in the image")
uid = lookup("passwd", name)
if group:
    gid = lookup("group", group)
else:
    gid = next(l.split(":")[3] for l in open(f"{sys.argv[2]}/etc/passwd") if l.split(":")[2] == uid)
def array(name, items):
    print(f"{name}=(" + " ".join(shlex.quote(i) for i in items) + ")")
array("img_env", config.get("Env") or [])
array("img_cmd", (config.get("Entrypoint") or []) + (config.get("Cmd") or []))
array("img_health", test)
print(f"img_user={shlex.quote(user)} img_uid={uid} img_gid={gid}")
print(f"img_workdir={shlex.quote(config.get('WorkingDir') or '/')}")
PY
)"
echo "image: USER $img_user ($img_uid:$img_gid), WORKDIR $img_workdir"
echo "image: CMD ${img_cmd[*]}"
echo "image: HEALTHCHECK ${img_health[*]:-(none)}"
echo "image: ENV ${img_env[*]}"
[ "$img_uid" != 0 ] && pass "the image runs as a non-root user" || fail "the image runs as root"
[ "${#img_health[@]}" -gt 0 ] && pass "the image has a HEALTHCHECK" || fail "the image has no HEALTHCHECK"
if [ -n "$(find "$root" -path "$root/proc" -prune -o -path '*/src/openai_proxy*' -print -quit)" ] ||
  [ -e "$root/src" ]; then
  fail "the source tree is in the image"
else
  pass "no source tree in the image"
fi
# Twisted rewrites a plugin cache that is not strictly newer, in whole
# seconds as a layer may keep them, than every plugin module beside it.
cache="$(find "$root/opt/venv" -path '*/twisted/plugins/dropin.cache' -print -quit)"
if [ -z "$cache" ]; then fail "the image has a plugin cache"; else
  newest="$(find "$(dirname "$cache")" -maxdepth 1 -name '*.py' -printf '%T@\n' | sort -n | tail -1)"
  if [ "$(stat -c %Y "$cache")" -gt "${newest%.*}" ]; then
    pass "the plugin cache is newer than every plugin module"
  else
    fail "the plugin cache ($(stat -c %Y "$cache")) is not newer than a plugin module (${newest%.*})"
  fi
fi

# -- 4. run it --------------------------------------------------------------------
# What a container runtime gives: /proc, a /dev of its own with the usual
# nodes (never the host's /dev bound in), and an empty /tmp.  The network is
# the host's: the fake upstream and the client run on the host's loopback.
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=755 tmpfs "$root/dev"
mknod -m 666 "$root/dev/null" c 1 3
mknod -m 666 "$root/dev/zero" c 1 5
mknod -m 666 "$root/dev/full" c 1 7
mknod -m 666 "$root/dev/random" c 1 8
mknod -m 666 "$root/dev/urandom" c 1 9
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"

# Processes whose root directory is the image's.
image_processes() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && echo "${p#/proc/}"
  done
  return 0
}
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $(image_processes); do kill -KILL "$pid" 2>/dev/null || true; done
  sleep 0.5
  umount "$root/tmp" "$root/dev" "$root/proc" 2>/dev/null || true
  if grep -q " $work/" /proc/mounts; then
    echo "warning: mounts left under $work; not removing it" >&2
  else
    rm -rf --one-file-system "$work"
  fi
}
trap cleanup EXIT

free_port() {
  "$host_python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Run "$@" in the image as its user, with its ENV plus the assignments in
# the array run_env, from its WORKDIR, as `docker run -e ...` would.
# exec: started with &, its pid is the command's own.
run_env=()
in_image() {
  exec chroot --userspec="$img_uid:$img_gid" --groups="$img_gid" "$root" \
    /usr/bin/env -i -C "$img_workdir" "${img_env[@]}" "${run_env[@]}" "$@"
}
healthcheck() { (in_image "${img_health[@]}"); }

fake_log="$work/fake.log"
PYTHONPATH="$repo" "$host_python" -m tests.serve_fake_upstream >"$fake_log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -s "$fake_log" ] && break; sleep 0.1; done
upstream="$(head -1 "$fake_log")"
proxy_key="proxy-key-$RANDOM$RANDOM"

# Start the image's CMD with PORT=$1; sets $proxy_pid, $proxy_log, $base_url.
start_proxy() {
  local port_setting="$1" number="$2"
  proxy_log="$work/proxy-$number.log"
  run_env=("PORT=$port_setting" "UPSTREAM=$upstream" "PROXY_KEY=$proxy_key"
    "OPENAI_KEY=sk-upstream-test" "GRACE=$grace")
  touch "$work/stamp"
  sleep 1 # so that anything written from now on is -newer than the stamp
  local started=$SECONDS
  in_image "${img_cmd[@]}" >"$proxy_log" 2>&1 &
  proxy_pid=$!
  pids+=("$proxy_pid")
  base_url="http://127.0.0.1:$number"
  for _ in $(seq 300); do
    curl_ok "$base_url/healthz" && break
    kill -0 "$proxy_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "started in about $((SECONDS - started)) s"
}
curl_ok() {
  "$host_python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

# Send SIGTERM; pass when the process is gone within GRACE seconds.
stop_proxy() {
  kill -TERM "$proxy_pid"
  local deadline=$((SECONDS + grace)) status=0
  while kill -0 "$proxy_pid" 2>/dev/null && [ "$SECONDS" -le "$deadline" ]; do sleep 0.1; done
  if kill -0 "$proxy_pid" 2>/dev/null; then
    fail "SIGTERM: still running after GRACE=$grace s"
    kill -KILL "$proxy_pid"
  else
    wait "$proxy_pid" || status=$?
    pass "SIGTERM: exited within GRACE=$grace s (status $status)"
  fi
  local left
  left="$(image_processes)"
  if [ -z "$left" ]; then pass "SIGTERM: no process of the image is left"; else
    fail "SIGTERM: processes of the image left: $left"
    kill -KILL $left 2>/dev/null || true
  fi
}

say "run 1: PORT=<number>"
port="$(free_port)"
start_proxy "$port" "$port"
if curl_ok "$base_url/healthz"; then pass "/healthz answers 200"; else
  fail "/healthz answers 200"
  tail -20 "$proxy_log"
fi
if healthcheck; then pass "HEALTHCHECK exits 0 while serving"; else fail "HEALTHCHECK exits 0 while serving"; fi
if PYTHONPATH="$repo" "$host_python" -m tests.check_stream "$base_url" "$proxy_key"; then
  pass "a chat stream relays through the image to the fake upstream"
else
  fail "a chat stream relays through the image to the fake upstream"
fi
stop_proxy
if healthcheck 2>/dev/null; then fail "HEALTHCHECK exits non-zero when not serving"; else
  pass "HEALTHCHECK exits non-zero when not serving"
fi
written="$(find "$root" -xdev -newer "$work/stamp" -not -path "$root/tmp" -not -path "$root/tmp/*" | head -20)"
if [ -z "$written" ]; then pass "nothing written outside /tmp"; else
  fail "written outside /tmp:"
  echo "$written"
fi
if grep -q "Unable to write to plugin cache" "$proxy_log"; then
  fail "twistd tried to write its plugin cache"
fi
echo "proxy log (run 1):"
sed 's/^/    /' "$proxy_log" | head -40

say "run 2: PORT=tcp:<number>:interface=0.0.0.0"
port="$(free_port)"
start_proxy "tcp:$port:interface=0.0.0.0" "$port"
if healthcheck; then pass "HEALTHCHECK exits 0 with PORT=tcp:$port:interface=0.0.0.0"; else
  fail "HEALTHCHECK exits 0 with PORT=tcp:$port:interface=0.0.0.0"
  tail -20 "$proxy_log"
fi
stop_proxy

echo
if [ "$failures" = 0 ]; then echo "image proof: all checks passed"; else echo "image proof: $failures check(s) failed"; fi
exit "$failures"
