#!/usr/bin/env bash
# sferd_jax on one machine with all of its GPUs, one process.
#
#   CONFIG=configs/cifar10_teacher.py WORKDIR=runs/c10 launch/gpu_local.sh [extra flags for sferd_jax.main]
#
# Rerunning the same command resumes the run from its last checkpoint. CUDA_VISIBLE_DEVICES=0,1 limits the GPUs.
#
# Required:
#   CONFIG    config file, relative to the repository root (or absolute), e.g. configs/cifar10_teacher.py
#   WORKDIR   the run folder (relative paths are under the repository root), or gs://<bucket>/<run> (needs
#             pip install -e '.[gcs]')
# Optional:
#   VENV      virtualenv to activate first (default: none; the python3 on PATH must have the requirements)
#   PYTHON    interpreter (default: python3, after VENV is activated)
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of each GPU's memory JAX takes at start (default here 0.90; JAX's own
#             0.75). XLA_PYTHON_CLIENT_PREALLOCATE=false allocates on demand instead: slower and fragmenting, but
#             it lets another process share the GPUs (e.g. an evaluation next to training).
#   ALLOW_CPU=1  run even when JAX finds no GPU (default: stop with a message, since the run would crawl on CPU)
#
# Batch size: config.*.batch_size is the global batch, split over the GPUs; it must be a multiple of their number.
set -euo pipefail

die() { echo "gpu_local.sh: $*" >&2; exit 2; }
need() { [[ -n "${!1:-}" ]] || die "set $1 ($2); see the top of launch/gpu_local.sh"; }

need CONFIG 'a config file, e.g. configs/cifar10_teacher.py'
need WORKDIR 'the run folder, e.g. runs/c10'

cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: no such file under $(pwd)"
if [[ -n "${VENV:-}" ]]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
PYTHON=${PYTHON:-python3}

# One process on one host: drop the variables that would make sferd_jax join a multi-host job (e.g. when this runs
# inside a SLURM allocation, which sets SLURM_NTASKS but starts no multi-process step).
unset JAX_COORDINATOR_ADDRESS OMPI_COMM_WORLD_SIZE TPU_WORKER_HOSTNAMES MEGASCALE_COORDINATOR_ADDRESS
for name in "${!SLURM_@}"; do unset "$name"; done
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}

if [[ "${ALLOW_CPU:-0}" != 1 ]]; then
  backend=$("$PYTHON" -c 'import jax; print(jax.default_backend(), jax.device_count())') \
    || die "$PYTHON cannot import jax: install the requirements (pip install -r requirements.txt -e .) or set VENV"
  [[ "$backend" == gpu* ]] || die "JAX sees no GPU ($backend): install JAX's CUDA plugin at the jax version of" \
    "requirements.txt (pip install 'jax[cuda13]==<that version>', or jax[cuda12] for older drivers), or set ALLOW_CPU=1"
  echo "gpu_local.sh: JAX backend $backend device(s)"
fi
exec "$PYTHON" -m sferd_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
