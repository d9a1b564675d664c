#!/usr/bin/env bash
# make image-test: build the Dockerfile's targets with buildah and check each image as a user
# would run it. No Docker engine or registry needed: base images are local stand-ins
# (../shared/CONTAINERS.md), and `buildah run` shares this machine's loopback.
#
#   cpu    its own command serves: /v2/health/ready is 200, the shipped digits model classifies
#          two real digits correctly; it runs as the non-root user, holds no torch and no
#          training code; SIGTERM to its process id drains (readiness 400, inference 503) and
#          it exits 0.
#   gpu    the same from the GPU target built with ORT_GPU_EXTRAS= (without NVIDIA's multi-GB
#          CUDA/cuDNN wheels; the stand-in base has no GPU anyway): it carries onnxruntime-gpu,
#          which offers CUDA, and serves on the CPU provider.
#   train  built with the CPU torch wheel copied into deploy/wheels/; `foldserve train` and
#          `foldserve export` run in it into mounted folders (buildah run --volume), and the cpu
#          image then serves the exported model from that folder.
#
# Environment: TORCH_WHEELS (folder with torch-<pin>+cpu-*.whl, default /opt/wheels),
# CONTAINER_BASES (the stand-in script, default ../shared/tools/container-bases.sh), KEEP=1 keeps
# the work folder, SKIP_TRAIN_IMAGE=1 leaves the train image out (refused when CI is set).
#
# Order on a new machine: check the inputs (each missing one fails at once, in one line), run
# the stand-in script (it installs buildah, podman and debootstrap, then makes the base images),
# check the tools it installed, and only then build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASES=${CONTAINER_BASES:-$ROOT/../shared/tools/container-bases.sh}
WORK=$(mktemp -d /tmp/foldserve-image-test.XXXXXX)
UID_EXPECTED=10001
CONTAINERS=()
SERVERS=()

log() { printf '\n== %s\n' "$*"; }
fail() {
  echo "image-test: FAIL: $*" >&2
  exit 1
}
cleanup() {
  local pid ctr
  for pid in "${SERVERS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for ctr in "${CONTAINERS[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
  if [ -z "${KEEP:-}" ]; then rm -rf "$WORK"; else echo "work folder kept: $WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

build() { # target tag [build options...]
  local target=$1 tag=$2
  shift 2
  log "build --target $target -> $tag"
  local start=$SECONDS
  buildah bud --isolation chroot --pull-never --layers --format docker \
    --target "$target" -t "$tag" "$@" . >"$WORK/build-$target.log" 2>&1 ||
    { tail -40 "$WORK/build-$target.log"; fail "building $target (log: $WORK/build-$target.log)"; }
  echo "built $tag in $((SECONDS - start)) s"
}

new_container() { # image: sets CTR to a new working container, removed at exit (no subshell,
  CTR=$(buildah from --pull-never "$1") # so that CONTAINERS keeps it)
  CONTAINERS+=("$CTR")
}

wait_ready() { # port log runner-pid
  local deadline=$((SECONDS + 180))
  until curl -fsS "http://127.0.0.1:$1/v2/health/ready" >/dev/null 2>&1; do
    kill -0 "$3" 2>/dev/null || { tail -30 "$2"; fail "the server exited before it was ready"; }
    [ $SECONDS -lt $deadline ] || { tail -30 "$2"; fail "not ready on 127.0.0.1:$1 after 180 s"; }
    sleep 1
  done
}

listener_pid() { # port -> the process id listening on it (the server, not buildah)
  ss -Hltnp "sport = :$1" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}

json_get() { # python expression over `doc`, read from stdin
  python3 -c "import json, sys; doc = json.load(sys.stdin); print($1)"
}

DIGIT_3='[[[0,0,7,15,13,1,0,0],[0,8,13,6,15,4,0,0],[0,2,1,13,13,0,0,0],[0,0,2,15,11,1,0,0],[0,0,0,1,12,12,1,0],[0,0,0,0,1,10,8,0],[0,0,8,4,5,14,9,0],[0,0,7,13,13,9,0,0]]]'
DIGIT_7='[[[0,0,7,8,13,16,15,1],[0,0,7,7,4,11,12,0],[0,0,0,0,8,13,1,0],[0,4,8,8,15,15,6,0],[0,2,11,15,15,4,0,0],[0,0,0,16,5,0,0,0],[0,0,9,15,1,0,0,0],[0,0,13,5,0,0,0,0]]]'

classify() { # port digit-json -> the top label
  curl -fsS -X POST "http://127.0.0.1:$1/v2/models/digits/classify?top_k=1" \
    -H 'content-type: application/json' -d "$2" | json_get 'doc["predictions"][0][0]["label"]'
}

check_no_torch() { # container
  buildah run --isolation chroot "$1" -- python -c '
import importlib.metadata as md, importlib.util as u, sys
leaks = [m for m in ("torch", "training") if u.find_spec(m)]
runtimes = [d for d in ("onnxruntime", "onnxruntime-gpu") if any(
    x.metadata["Name"] == d for x in md.distributions())]
print("onnx runtime packages:", runtimes, "| torch/training:", leaks or "none")
sys.exit(1 if leaks or len(runtimes) != 1 else 0)' ||
    fail "$1 holds torch or training code, or not exactly one ONNX Runtime"
}

serve_and_check() { # image label
  local image=$1 label=$2 ctr port runner pid uid status log cmd=()
  log "$label: run the image's own command"
  new_container "$image"
  ctr=$CTR
  mapfile -t cmd < <(buildah inspect --type image --format '{{range .Docker.Config.Cmd}}{{println .}}{{end}}' "$image")
  port=$(free_port)
  log=$WORK/serve-$label.log
  # Only the address changes: 127.0.0.1 and a free port instead of 0.0.0.0:8000.
  buildah run --isolation chroot --env FOLDSERVE_HOST=127.0.0.1 --env FOLDSERVE_PORT="$port" \
    "$ctr" -- "${cmd[@]}" >"$log" 2>&1 &
  runner=$!
  wait_ready "$port" "$log" "$runner"
  pid=$(listener_pid "$port")
  [ -n "$pid" ] || fail "$label: no process listens on $port"
  SERVERS+=("$pid")
  echo "command: ${cmd[*]} (server pid $pid)"

  uid=$(awk '/^Uid:/{print $2}' "/proc/$pid/status")
  [ "$uid" = "$UID_EXPECTED" ] || fail "$label: server runs as uid $uid, not $UID_EXPECTED"
  echo "runs as uid $uid (non-root)"

  [ "$(classify "$port" "$DIGIT_3")" = 3 ] || fail "$label: the digits model misread a 3"
  [ "$(classify "$port" "$DIGIT_7")" = 7 ] || fail "$label: the digits model misread a 7"
  echo "digits: a 3 and a 7 classified correctly"

  local providers
  providers=$(curl -fsS "http://127.0.0.1:$port/v2/models/digits/config" | json_get 'doc["runtime"]["providers"]')
  [ "$providers" = "['CPUExecutionProvider']" ] || fail "$label: serves on $providers"
  echo "serves on $providers"
  check_no_torch "$ctr"

  log "$label: SIGTERM to pid $pid"
  kill -TERM "$pid"
  sleep 0.5
  status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/v2/health/ready")
  [ "$status" = 400 ] || fail "$label: readiness $status while draining, not 400"
  status=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -d "$DIGIT_3" "http://127.0.0.1:$port/v2/models/digits/classify")
  [ "$status" = 503 ] || fail "$label: inference $status while draining, not 503"
  echo "draining: readiness 400, new inference 503"
  status=0
  wait "$runner" || status=$?
  [ "$status" = 0 ] || { tail -20 "$log"; fail "$label: exited with $status after SIGTERM"; }
  echo "exited 0"
}

# ------------------------------------------------------------------ inputs, tools, base images
[ -f "$BASES" ] || fail "no stand-in script at $BASES (set CONTAINER_BASES; see ../shared/CONTAINERS.md)"
pin=$(sed -n 's/^torch==//p' constraints.txt)
[ -n "$pin" ] || fail "constraints.txt pins no torch version"
wheel_dir=${TORCH_WHEELS:-/opt/wheels}
wheel=""
if [ -n "${SKIP_TRAIN_IMAGE:-}" ]; then
  [ -z "${CI:-}" ] || fail "SKIP_TRAIN_IMAGE is set, but CI must build and run every image"
  echo "image-test: the train image is left out (SKIP_TRAIN_IMAGE)"
else
  [ -d "$wheel_dir" ] || fail "no torch wheel folder $wheel_dir (set TORCH_WHEELS to a folder holding torch-$pin+cpu-*.whl, or SKIP_TRAIN_IMAGE=1 outside CI)"
  wheel=$(find "$wheel_dir" -maxdepth 1 -name "torch-$pin+cpu-*.whl" | head -1)
  [ -n "$wheel" ] || fail "no torch-$pin+cpu-*.whl in $wheel_dir: without it the train image would download PyPI's multi-GB CUDA torch"
fi
[ "$(id -u)" = 0 ] || fail "needs root: buildah runs with chroot isolation and the stand-in script installs packages"

log "base images (local stand-ins; installs buildah, podman and debootstrap if missing)"
bash "$BASES" || fail "the stand-in script $BASES failed"
for tool in buildah podman; do
  command -v "$tool" >/dev/null || fail "$tool is still missing after $BASES"
done
podman image exists docker.io/library/python:3.11-slim ||
  fail "no python:3.11-slim stand-in after $BASES"

# ------------------------------------------------------------------ serving images
build cpu foldserve:cpu
build gpu foldserve:gpu-nocuda --build-arg ORT_GPU_EXTRAS=
serve_and_check foldserve:cpu cpu
new_container foldserve:gpu-nocuda
gpu_ctr=$CTR
buildah run --isolation chroot "$gpu_ctr" -- python -c '
import onnxruntime as ort, sys
print("onnxruntime-gpu offers", ort.get_available_providers())
sys.exit("CUDAExecutionProvider" not in ort.get_available_providers())' ||
  fail "the gpu image's ONNX Runtime offers no CUDA provider"
serve_and_check foldserve:gpu-nocuda gpu

# ------------------------------------------------------------------ training image
if [ -z "$wheel" ]; then
  log "image-test: cpu and gpu checks passed; train left out (SKIP_TRAIN_IMAGE)"
  exit 0
fi
cp -u "$wheel" deploy/wheels/
build train foldserve:train
log "train: foldserve train + export into mounted folders"
mkdir -p "$WORK/runs" "$WORK/models"
chown "$UID_EXPECTED:$UID_EXPECTED" "$WORK/runs" "$WORK/models"
new_container foldserve:train
train_ctr=$CTR
check_train=$(buildah run --isolation chroot "$train_ctr" -- python -c 'import torch; print(torch.__version__)')
echo "torch $check_train"
buildah run --isolation chroot --volume "$WORK/runs:/runs" --volume "$WORK/models:/models" "$train_ctr" -- \
  foldserve train --out /runs/digits --epochs 3 --no-progress
buildah run --isolation chroot --volume "$WORK/runs:/runs" --volume "$WORK/models:/models" "$train_ctr" -- \
  foldserve export /runs/digits/checkpoint.pt --repository /models --name digits
[ -f "$WORK/models/digits/1/model.onnx" ] || fail "export wrote no $WORK/models/digits/1/model.onnx"
echo "exported $WORK/models/digits/1/model.onnx"

log "cpu image serves the exported model from the mounted folder"
new_container foldserve:cpu
serve_ctr=$CTR
port=$(free_port)
buildah run --isolation chroot --volume "$WORK/models:/models:ro" --env FOLDSERVE_HOST=127.0.0.1 \
  --env FOLDSERVE_PORT="$port" --env FOLDSERVE_SHUTDOWN_GRACE_S=0 "$serve_ctr" -- foldserve serve \
  >"$WORK/serve-exported.log" 2>&1 &
runner=$!
wait_ready "$port" "$WORK/serve-exported.log" "$runner"
pid=$(listener_pid "$port")
SERVERS+=("$pid")
label=$(classify "$port" "$DIGIT_3")
echo "the freshly trained model reads the 3 as $label"
[[ $label =~ ^[0-9]$ ]] || fail "no label from the exported model"
kill -TERM "$pid"
wait "$runner" || fail "the server of the exported model did not exit 0"

log "image-test: all checks passed"
