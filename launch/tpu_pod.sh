#!/usr/bin/env bash
# Runs sferd_jax on every worker of an existing Cloud TPU VM slice (v4-32, v5p-64, v6e-16, ...): copies this
# checkout to each worker, installs it in a virtualenv there, and starts the same command on all workers at once.
# It creates nothing in the cloud: create the TPU VM and the shared folder first (launch/README.md).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project \
#   CONFIG=configs/cifar10_teacher.py WORKDIR=/mnt/shared/runs/c10 \
#     launch/tpu_pod.sh [all|setup|run|stop] [-- extra flags for sferd_jax.main, e.g. --config.seed=1]
#
#   all    setup, then run (the default)
#   setup  copy the checkout's git-tracked files to every worker and pip install them (run again after edits)
#   run    start `python -m sferd_jax.main --config=$CONFIG --workdir=$WORKDIR` on every worker, in the foreground;
#          the output of all workers is streamed here. Rerunning the same command resumes the run.
#   stop   stop the run started by `run` on every worker (by its process id), e.g. after an interrupted ssh
#
# Required:
#   TPU_NAME   the TPU VM's name (gcloud compute tpus tpu-vm list --zone=...)
#   ZONE       its zone
#   PROJECT    its Google Cloud project
#   CONFIG     (run) config file, relative to the repository root, e.g. configs/cifar10_teacher.py
#   WORKDIR    (run) the run folder: a bucket, gs://<bucket>/<run> (what a TPU VM has: the workers' service account
#              needs write access to it), or an absolute path every worker mounts at that same path (NFS,
#              Filestore, Lustre).
# Optional:
#   REMOTE_DIR        where the checkout goes on each worker (default: sferd_jax, in the remote home)
#   REMOTE_VENV       the virtualenv made on each worker (default: sferd_venv, in the remote home)
#   PYTHON            Python >= 3.11 on the workers, used to make REMOTE_VENV (default: python3; older TPU VM images
#                     ship 3.10: install a newer one there and name it here)
#   JAX_TPU_SPEC      pip requirement for JAX with TPU support (default: jax[tpu]==<the jax pin in requirements.txt>)
#   EXTRAS            setup.py extras to install (default: data, and gcs when WORKDIR is gs://; empty for none)
#   COORDINATOR_PORT  port of the JAX coordinator on worker 0 (default: 8482, JAX's own default on Cloud TPU)
#   TFDS_DATA_DIR     passed on to the workers when set: prepared TFDS datasets, on a path every worker sees
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
need() { [[ -n "${!1:-}" ]] || die "set $1 ($2); see the top of launch/tpu_pod.sh"; }

ACTION=all
if [[ $# -gt 0 && "$1" != -- ]]; then ACTION=$1; shift; fi
[[ "${1:-}" == -- ]] && shift
EXTRA_ARGS=("$@")
case "$ACTION" in all|setup|run|stop) ;; *) die "unknown action '$ACTION': use all, setup, run or stop";; esac

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
need TPU_NAME 'the TPU VM name'
need ZONE 'the TPU zone, e.g. us-central2-b'
need PROJECT 'the Google Cloud project'
if [[ "$ACTION" == all || "$ACTION" == run ]]; then
  need CONFIG 'a config file, e.g. configs/cifar10_teacher.py'
  need WORKDIR 'gs://<bucket>/<run>, or an absolute run folder on a filesystem shared by all workers'
  [[ -f "$REPO_ROOT/$CONFIG" ]] || die "CONFIG=$CONFIG: no such file under $REPO_ROOT"
  [[ "$WORKDIR" == /* || "$WORKDIR" == gs://* ]] || die "WORKDIR=$WORKDIR must be gs://<bucket>/<run> or an" \
    "absolute path, the same on every worker"
fi

REMOTE_DIR=${REMOTE_DIR:-sferd_jax}
REMOTE_VENV=${REMOTE_VENV:-sferd_venv}
PYTHON=${PYTHON:-python3}
if [[ "${WORKDIR:-}" == gs://* ]]; then EXTRAS=${EXTRAS-data,gcs}; else EXTRAS=${EXTRAS-data}; fi
COORDINATOR_PORT=${COORDINATOR_PORT:-8482}
if [[ -z "${JAX_TPU_SPEC:-}" ]]; then
  jax_pin=$(sed -n 's/^jax==\([^ ]*\).*/\1/p' "$REPO_ROOT/requirements.txt")
  [[ -n "$jax_pin" ]] || die "no jax== pin in requirements.txt; set JAX_TPU_SPEC, e.g. 'jax[tpu]'"
  JAX_TPU_SPEC="jax[tpu]==$jax_pin"
fi
command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI and run gcloud auth login"
GCLOUD_TPU=(--zone="$ZONE" --project="$PROJECT")

on_all_workers() {  # runs the bash script $1 on every worker at once; fails when any worker fails
  # Shipped base64-encoded, so that no quoting survives two shells and ssh.
  local encoded
  encoded=$(printf '%s' "$1" | base64 | tr -d '\n')
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_TPU[@]}" --worker=all \
    --command="bash -c \"\$(echo $encoded | base64 -d)\""
}

# Shared by the remote scripts: absolute paths on the worker (relative ones are under the remote home).
REMOTE_PRELUDE="set -euo pipefail
$(printf 'repo=%q venv=%q python=%q pid_file=.sferd_jax_run.pid' "$REMOTE_DIR" "$REMOTE_VENV" "$PYTHON")"'
cd
case $repo in /*) ;; *) repo=$HOME/$repo;; esac
case $venv in /*) ;; *) venv=$HOME/$venv;; esac
pid_file=$HOME/$pid_file
host=$(hostname)'

setup() {
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "$REPO_ROOT is not a git checkout: setup copies" \
    "its git-tracked files"
  local tarball
  tarball=$(mktemp "${TMPDIR:-/tmp}/sferd_jax_src.XXXXXX")
  # Tracked files as they are on disk (uncommitted edits included): no .venv, runs or caches.
  (cd "$REPO_ROOT" && git ls-files -z | tar --null -T - -czf "$tarball")
  echo "tpu_pod.sh: copying $(du -h "$tarball" | cut -f1) of tracked files to every worker of $TPU_NAME"
  gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":sferd_jax_src.tar.gz "${GCLOUD_TPU[@]}" --worker=all
  rm -f "$tarball"
  on_all_workers "$REMOTE_PRELUDE
$(printf 'jax_spec=%q extras=%q' "$JAX_TPU_SPEC" "${EXTRAS:+[$EXTRAS]}")"'
"$python" -c "import sys; sys.exit(sys.version_info < (3, 11))" || {
  echo "$host: $python is $("$python" -V 2>&1); sferd_jax needs Python >= 3.11: set PYTHON" >&2; exit 1; }
mkdir -p "$repo"
tar -xzf sferd_jax_src.tar.gz -C "$repo" && rm sferd_jax_src.tar.gz
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "$jax_spec" -e "$repo$extras"
echo "$host: installed in $venv, jax $("$venv/bin/python" -c "import jax; print(jax.__version__)")"'
}

run() {
  local worker0
  worker0=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_TPU[@]}" \
    --format='value(networkEndpoints[0].ipAddress)')
  [[ -n "$worker0" ]] || die "could not read worker 0's address of $TPU_NAME (gcloud compute tpus tpu-vm describe)"
  # (The ${a[@]+...} form keeps an empty array legal under set -u in macOS's bash 3.2.)
  local args=(--config="$CONFIG" --workdir="$WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  echo "tpu_pod.sh: starting on every worker of $TPU_NAME (coordinator $worker0:$COORDINATOR_PORT):" \
    "python -m sferd_jax.main ${args[*]}"
  # JAX_COORDINATOR_ADDRESS makes sferd_jax call jax.distributed.initialize(), which reads the process count and
  # ids from the TPU metadata. Orbax needs that distributed client to checkpoint from several processes.
  on_all_workers "$REMOTE_PRELUDE
export JAX_COORDINATOR_ADDRESS=$(printf %q "$worker0:$COORDINATOR_PORT")
${TFDS_DATA_DIR:+export TFDS_DATA_DIR=$(printf %q "${TFDS_DATA_DIR:-}")}
args=($(printf '%q ' "${args[@]}"))"'
cd "$repo"
"$venv/bin/python" -m sferd_jax.main "${args[@]}" &
pid=$!
echo $pid > "$pid_file"
wait $pid && status=0 || status=$?
rm -f "$pid_file"
exit $status'
}

stop() {
  on_all_workers "$REMOTE_PRELUDE"'
pid=$(cat "$pid_file" 2>/dev/null || true)
# Only a process that is still our run: a stale pid file may name a recycled process id.
if [[ -n "$pid" ]] && grep -qa sferd_jax.main "/proc/$pid/cmdline" 2>/dev/null && kill "$pid"; then
  echo "$host: stopped process $pid"
else
  echo "$host: nothing running"
fi
rm -f "$pid_file"'
}

case "$ACTION" in
  all) setup; run;;
  setup) setup;;
  run) run;;
  stop) stop;;
esac
