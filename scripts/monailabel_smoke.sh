#!/usr/bin/env bash
# MONAI Label smoke test of the unet25d_mra bundle (docs/monailabel.md).
#
# Loads this bundle from a local folder into MONAI Label's `monaibundle` sample app (0.8.x,
# no model-zoo download), starts `monailabel start_server` on 127.0.0.1, sends an inference
# request for a synthetic case and checks the returned mask (shape and affine of the image,
# values in {0, 1}), sends a one-epoch training request (run_sync) and checks that it wrote a
# new models/model.pt, infers again with that model, and stops the server.
#
# MONAI Label pins its own numpy, DICOM and MONAI packages, so it lives in a virtual
# environment of its own, made on the first run (4-7 minutes, about 8 GB):
#   MONAILABEL_VENV   the environment (default: <bundle>/.venv-monailabel, git-ignored)
#   MONAILABEL_WORK   working folder for the app, studies and logs (default: a temporary
#                     folder, removed at exit; a folder given here is kept)
#   MONAILABEL_PORT   server port on 127.0.0.1 (default: a free one)
#   PYTHON            the Python 3.11 that makes the environment (default: python3)
# The last line printed is "monailabel_smoke: OK" when every check passed.
set -euo pipefail

BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME=unet25d_mra
VENV="${MONAILABEL_VENV:-$BUNDLE/.venv-monailabel}"
PYTHON="${PYTHON:-python3}"
# torch 2.13.0's CPU wheel has no importable torchvision here (PyPI's torchvision 0.28.0 is a
# CUDA build); torch 2.14.1 with torchvision 0.29.1 is a matching pair that runs on the CPU.
# MONAI 1.6 breaks MONAI Label 0.8.5's inference (Spacingd updates its "image_path" string),
# MONAI Label 0.8.5 needs pydicom 2 (pydicom-seg 0.4.1), and so the DICOM clients that accept it
# (docs/monailabel.md: the environment, and why each pin).
CONSTRAINTS="torch==2.14.1
torchvision==0.29.1
monai==1.5.2
pydicom<3
pynetdicom<3
dicomweb-client<0.60"
TRAIN_REQUEST='{"max_epochs": 1, "val_split": 0.25, "device": "cpu", "multi_gpu": false, "pretrained": true}'

log() { echo "monailabel_smoke: $*"; }
fail() { echo "monailabel_smoke: FAILED: $*" >&2; exit 1; }

SERVER_PID=""
KEEP_WORK=1
if [ -z "${MONAILABEL_WORK:-}" ]; then
  WORK="$(mktemp -d -t monailabel_smoke.XXXXXX)"
  KEEP_WORK=0
else
  WORK="$(mkdir -p "$MONAILABEL_WORK" && cd "$MONAILABEL_WORK" && pwd)"
fi

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    log "stopping the server (process group $SERVER_PID)"
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

cleanup() {
  local status=$?
  stop_server
  if [ "$status" -ne 0 ] && [ -f "$WORK/server.log" ]; then
    echo "--- last lines of $WORK/server.log ---" >&2
    tail -n 40 "$WORK/server.log" >&2 || true
  fi
  if [ "$KEEP_WORK" -eq 0 ]; then rm -rf "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The virtual environment of MONAI Label, made once; a stamp file marks a finished install.
setup_venv() {
  if [ -f "$VENV/.monailabel-smoke-ready" ]; then
    log "using the MONAI Label environment $VENV"
    return
  fi
  log "making the MONAI Label environment $VENV (first run only)"
  if [ -e "$VENV" ]; then
    # only an unfinished environment of this script is replaced
    [ -f "$VENV/constraints-monailabel.txt" ] \
      || fail "$VENV exists but was not made by this script; remove it or set MONAILABEL_VENV to another folder"
    rm -rf "$VENV"
  fi
  "$PYTHON" -m venv "$VENV"
  printf '%s\n' "$CONSTRAINTS" > "$VENV/constraints-monailabel.txt"
  "$VENV/bin/pip" install --quiet torch==2.14.1 torchvision==0.29.1 -c "$VENV/constraints-monailabel.txt"
  "$VENV/bin/pip" install --quiet "monailabel==0.8.*" -c "$VENV/constraints-monailabel.txt"
  # monai 1.5.2[ignite] pins pytorch-ignite 0.4.11; the bundle's configs use ignite 0.5 names
  # (ignite.handlers.ProgressBar), as with monai 1.6.1, and monai 1.5.2 runs with 0.5.5
  "$VENV/bin/pip" install --quiet --no-deps pytorch-ignite==0.5.5
  "$VENV/bin/pip" check || log "pip check found the problems above"
  touch "$VENV/.monailabel-smoke-ready"
}

# Five synthetic 40x36x32 cases; case_000 stays unlabelled (the image to annotate), the other
# four have final labels, as MONAI Label's local datastore lays them out.
make_studies() {
  (cd "$BUNDLE" && "$VPY" -m scripts.synthetic --output_dir "$WORK/synthetic" --num_cases 5 --seed 0 \
    --size "[40,36,32]" --spacing 0.6) > "$WORK/synthetic.log" 2>&1 || fail "scripts.synthetic, see $WORK/synthetic.log"
  mkdir -p "$WORK/studies/labels/final"
  for i in 0 1 2 3 4; do
    cp "$WORK/synthetic/imagesTr/case_00$i.nii.gz" "$WORK/studies/"
    [ "$i" -eq 0 ] || cp "$WORK/synthetic/labelsTr/case_00$i.nii.gz" "$WORK/studies/labels/final/"
  done
  log "studies: $(ls "$WORK/studies" | grep -c nii.gz) images, $(ls "$WORK/studies/labels/final" | wc -l) labelled"
}

# The monaibundle app as MONAI Label installs it, with this bundle in its model/ folder.
make_app() {
  "${MONAILABEL[@]}" apps --download --name monaibundle --output "$WORK/apps" > "$WORK/apps.log" 2>&1 \
    || fail "monailabel apps --download, see $WORK/apps.log"
  APP="$WORK/apps/monaibundle"
  MODEL_DIR="$APP/model/$NAME"
  mkdir -p "$MODEL_DIR"
  tar -C "$BUNDLE" --exclude=__pycache__ -cf - configs scripts LICENSE | tar -C "$MODEL_DIR" -xf -
  log "app: $APP, bundle copied to $MODEL_DIR"
}

# MONAI Label registers a bundle's inferer only if models/model.pt exists when the server
# starts: one epoch of the bundle's own training makes it.
initial_model() {
  (cd "$MODEL_DIR" && "$VPY" -m monai.bundle run training --config_file configs/train.json --bundle_root . \
    --dataset_dir "$WORK/synthetic" --epochs 1 --val_interval 1 --roi_size "[32,32,32]" --num_samples 1 \
    --batch_size 1 --cache_rate 0 --num_workers 0) > "$WORK/initial_training.log" 2>&1 \
    || fail "the bundle's training, see $WORK/initial_training.log"
  [ -f "$MODEL_DIR/models/model.pt" ] || fail "the bundle's training wrote no models/model.pt"
  log "initial model: $MODEL_DIR/models/model.pt (1 epoch of configs/train.json)"
}

start_server() {
  PORT="${MONAILABEL_PORT:-$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
  URL="http://127.0.0.1:$PORT"
  log "starting monailabel start_server on $URL"
  MONAI_LABEL_SESSION_PATH="$WORK/sessions" setsid "${MONAILABEL[@]}" start_server \
    --app "$APP" --studies "$WORK/studies" --host 127.0.0.1 --port "$PORT" \
    --conf models "$NAME" --conf zoo_source local --conf sam2 false --conf preload false \
    > "$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 180); do
    kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited while starting"
    if curl -sf -o "$WORK/info.json" "$URL/info/"; then
      "$VPY" - "$WORK/info.json" "$NAME" "$MODEL_DIR/configs/metadata.json" <<'EOF'
import json, sys
info, name = json.load(open(sys.argv[1])), sys.argv[2]
for section in ("models", "trainers"):
    if name not in info[section]:
        sys.exit(f"{name} is not among the server's {section}: {sorted(info[section])}")
    # models/*.pt are offered as model_filename: the training state (checkpoint.ckpt) must not be
    offered = info[section][name]["config"]["model_filename"]
    if offered != ["model.pt"]:
        sys.exit(f"/info/ {section}.{name}.config.model_filename is {offered}, expected ['model.pt']")
# the label names and values of the output's channel_def, less background, as MONAI Label reads them
channel_def = json.load(open(sys.argv[3]))["network_data_format"]["outputs"]["pred"]["channel_def"]
expected = {label: int(value) for value, label in channel_def.items() if label.lower() != "background"}
labels = info["models"][name]["labels"]
if labels != expected:
    sys.exit(f"/info/ models.{name}.labels is {labels}, expected {expected} from {sys.argv[3]} channel_def")
print(f"monailabel_smoke: server up: {info['name']}; model {name} labels {labels}, model_filename "
      f"{info['models'][name]['config']['model_filename']}; trainer {name}; "
      f"datastore {info['datastore']['total']} images, {info['datastore']['completed']} labelled")
EOF
      return
    fi
    sleep 1
  done
  fail "no answer from $URL/info/ within 180 s"
}

# POST /infer/<bundle>?image=<case>&output=image and check the mask against the image file.
infer() {
  local out="$WORK/$1_seg_$2.nii.gz"
  curl -sS -f --max-time 600 -X POST "$URL/infer/$NAME?image=$1&output=image" -o "$out" \
    || fail "POST /infer/$NAME?image=$1"
  "$VPY" - "$WORK/studies/$1.nii.gz" "$out" <<'EOF'
import sys
import nibabel as nib
import numpy as np
image, label = nib.load(sys.argv[1]), nib.load(sys.argv[2])
values = np.unique(np.asarray(label.dataobj)).tolist()
if label.shape != image.shape:
    sys.exit(f"{sys.argv[2]}: shape {label.shape}, the image's is {image.shape}")
if not np.allclose(label.affine, image.affine, atol=1e-4):
    sys.exit(f"{sys.argv[2]}: affine\n{label.affine}\ndiffers from the image's\n{image.affine}")
if not set(values) <= {0, 1}:
    sys.exit(f"{sys.argv[2]}: values {values}, expected a subset of [0, 1]")
print(f"monailabel_smoke: infer: {sys.argv[2]}: shape {label.shape} == image shape, same affine, values {values}, "
      f"{int(np.sum(np.asarray(label.dataobj) > 0))} foreground voxels")
EOF
}

# POST /train/<bundle>?run_sync=true for one epoch; the bundle's validation must save a new model.pt.
train() {
  local before
  before="$(sha256sum "$MODEL_DIR/models/model.pt")"
  curl -sS -f --max-time 900 -X POST "$URL/train/$NAME?run_sync=true" -H "Content-Type: application/json" \
    -d "$TRAIN_REQUEST" -o "$WORK/train_response.json" || fail "POST /train/$NAME?run_sync=true"
  grep -q "Training Finished" "$WORK/server.log" || fail "the server log does not say 'Training Finished'"
  [ "$(sha256sum "$MODEL_DIR/models/model.pt")" != "$before" ] || fail "the training request left models/model.pt unchanged"
  log "train: $TRAIN_REQUEST -> $(cat "$WORK/train_response.json"); models/model.pt rewritten"
}

START=$(date +%s)
unset PYTHONPATH
setup_venv
VPY="$VENV/bin/python"
# what the `monailabel` command runs, without its wrapper, which puts the venv's parent folder
# (here the bundle root) on PYTHONPATH and takes whichever `python` comes first on PATH
MONAILABEL=("$VPY" -m monailabel.main)
log "$("$VPY" -c 'import monai, monailabel, torch; print(f"monailabel {monailabel.__version__}, monai {monai.__version__}, torch {torch.__version__}")')"
make_studies
make_app
initial_model
start_server
infer case_000 before_training
train
infer case_000 after_training
stop_server
log "work folder: $WORK$([ "$KEEP_WORK" -eq 1 ] || echo ' (removed)'); $(($(date +%s) - START)) s"
log "OK"
