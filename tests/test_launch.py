"""launch/: the scripts parse, refuse to start without their required variables (before touching gcloud or srun),
and hand the right command and environment to stub gcloud / srun / python; initialize_distributed() is a no-op on
one host. Then the SLURM and TPU-pod launchers executed, with stand-ins for srun and gcloud that start two real JAX
processes here. Nothing here reaches a cloud or a cluster."""

import os
import random
import socket
import stat
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from sferd_jax import exports
from sferd_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, 'launch')
SCRIPTS = sorted(os.path.join(LAUNCH, f) for f in os.listdir(LAUNCH) if f.endswith(('.sh', '.sbatch')))
MULTI_HOST_VARS = ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
                   'MEGASCALE_COORDINATOR_ADDRESS')

# Prints how it was called; `-c` (a version or backend probe) answers like a GPU machine's Python would.
PYTHON_STUB = r"""#!/bin/bash
if [[ "$1" == -c ]]; then
  case "$2" in *default_backend*) echo "gpu 8";; *__version__*) echo 0.10.2;; esac
  exit 0
fi
{ echo "cwd=$PWD"; echo "args=$*"
  env | grep -E '^(JAX_|XLA_|SLURM_|TFDS_|OMPI_|TPU_|MEGASCALE_)' | sort; } > "$CALLS/python.txt"
"""
# gcloud: logs each call; describe answers worker 0's address; scp copies into $HOME; ssh runs the command here,
# as every worker's shell would.
GCLOUD_STUB = r"""#!/bin/bash
echo "$*" >> "$CALLS/gcloud.txt"
case "$4" in
  describe) echo 10.1.2.3;;
  scp) cp "$5" "$HOME/${6#*:}";;
  ssh) for a in "$@"; do [[ "$a" == --command=* ]] && cmd=${a#--command=}; done; bash -c "$cmd";;
esac
"""
SRUN_STUB = r"""#!/bin/bash
echo "srun $*" > "$CALLS/srun.txt"
shift 2  # --ntasks-per-node=1 --kill-on-bad-exit=1
exec "$@"
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


@pytest.fixture
def sandbox(tmp_path):
  """A fake home, a bin/ of stubs first on PATH, and a calls/ folder the stubs report to."""
  home, bin_dir, calls = tmp_path / 'home', tmp_path / 'bin', tmp_path / 'calls'
  for d in (home, bin_dir, calls):
    d.mkdir()
  _executable(bin_dir / 'gcloud', GCLOUD_STUB)
  _executable(bin_dir / 'srun', SRUN_STUB)
  _executable(bin_dir / 'python3', PYTHON_STUB)
  env = {'PATH': f'{bin_dir}:/usr/bin:/bin', 'HOME': str(home), 'CALLS': str(calls), 'TMPDIR': str(tmp_path)}
  return env, home, calls


def _run(script, env, *args, timeout=60):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT, check=False)


def _read(path):
  with open(path) as f:
    return f.read()


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_parse_and_are_strict(script):
  subprocess.run(['bash', '-n', script], check=True)
  with open(script) as f:
    assert 'set -euo pipefail' in f.read()


def test_the_three_launchers_exist():
  assert [os.path.basename(s) for s in SCRIPTS] == ['gpu_local.sh', 'gpu_slurm.sbatch', 'tpu_pod.sh']
  assert os.path.exists(os.path.join(LAUNCH, 'README.md'))


@pytest.mark.parametrize('script,env,message', [
    ('tpu_pod.sh', {}, 'set TPU_NAME'),
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z'}, 'set PROJECT'),
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p'}, 'set CONFIG'),
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p', 'CONFIG': 'configs/tiny.py'}, 'set WORKDIR'),
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p', 'CONFIG': 'configs/nope.py', 'WORKDIR': '/w'},
     'no such file'),
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p', 'CONFIG': 'configs/tiny.py', 'WORKDIR': 'runs/x'},
     'or an absolute path'),
    ('gpu_slurm.sbatch', {}, 'set CONFIG'),
    ('gpu_slurm.sbatch', {'CONFIG': 'configs/tiny.py'}, 'set WORKDIR'),
    ('gpu_slurm.sbatch', {'CONFIG': 'configs/tiny.py', 'WORKDIR': 'runs/x'}, 'must be an absolute path, the same'),
    ('gpu_slurm.sbatch', {'CONFIG': 'configs/tiny.py', 'WORKDIR': '/shared/run'}, 'submit it with sbatch'),
    ('gpu_local.sh', {}, 'set CONFIG'),
    ('gpu_local.sh', {'CONFIG': 'configs/tiny.py'}, 'set WORKDIR'),
    ('gpu_local.sh', {'CONFIG': 'configs/nope.py', 'WORKDIR': 'runs/x'}, 'no such file'),
])
def test_missing_or_bad_variables_fail_before_any_remote_call(sandbox, script, env, message):
  base, _, calls = sandbox
  result = _run(script, {**base, **env})
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert os.listdir(calls) == [], 'gcloud, srun or python was called'


def test_tpu_pod_unknown_action(sandbox):
  base, _, _ = sandbox
  result = _run('tpu_pod.sh', {**base, 'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p'}, 'deploy')
  assert result.returncode == 2 and "unknown action 'deploy'" in result.stderr


def test_tpu_pod_setup_run_and_stop_on_stub_workers(sandbox):
  base, home, calls = sandbox
  venv_bin = home / 'sferd_venv' / 'bin'
  venv_bin.mkdir(parents=True)
  _executable(venv_bin / 'python', PYTHON_STUB)
  _executable(venv_bin / 'pip', '#!/bin/bash\necho "$*" >> "$CALLS/pip.txt"\n')
  env = {**base, 'TPU_NAME': 'my-pod', 'ZONE': 'us-central2-b', 'PROJECT': 'proj', 'CONFIG': 'configs/tiny.py',
         'WORKDIR': 'gs://bucket/run one', 'TFDS_DATA_DIR': '/mnt/shared/tfds'}
  result = _run('tpu_pod.sh', env, 'all', '--', '--config.seed=3', "--config.data.name=it's")
  assert result.returncode == 0, result.stdout + result.stderr

  gcloud = _read(calls / 'gcloud.txt').splitlines()
  assert gcloud[0].startswith('compute tpus tpu-vm scp ') and gcloud[0].endswith(
      'my-pod:sferd_jax_src.tar.gz --zone=us-central2-b --project=proj --worker=all')
  assert all('--worker=all' in line for line in gcloud if ' ssh ' in line)
  assert any(line.startswith('compute tpus tpu-vm describe my-pod') for line in gcloud)
  # Setup: the tracked files unpacked on the worker, installed with JAX's TPU extra at the pinned version.
  assert (home / 'sferd_jax' / 'sferd_jax' / 'main.py').exists() and not (home / 'sferd_jax' / '.venv').exists()
  assert not (home / 'sferd_jax_src.tar.gz').exists()
  pip = _read(calls / 'pip.txt')
  assert 'install -q jax[tpu]==' in pip and f'-e {home}/sferd_jax[data,gcs]' in pip  # gcs: for the bucket
  # Run: every worker starts the same command, with the coordinator on worker 0, arguments intact.
  python = _read(calls / 'python.txt')
  assert f'cwd={home}/sferd_jax' in python
  assert ("args=-m sferd_jax.main --config=configs/tiny.py --workdir=gs://bucket/run one --config.seed=3 "
          "--config.data.name=it's") in python
  assert 'JAX_COORDINATOR_ADDRESS=10.1.2.3:8482' in python and 'TFDS_DATA_DIR=/mnt/shared/tfds' in python
  assert not (home / '.sferd_jax_run.pid').exists()  # removed when the run ended


def test_tpu_pod_stop_kills_only_our_run(sandbox):
  base, home, _ = sandbox
  env = {**base, 'TPU_NAME': 'my-pod', 'ZONE': 'z', 'PROJECT': 'p'}
  pid_file = home / '.sferd_jax_run.pid'
  ours = subprocess.Popen(['bash', '-c', 'exec -a "python -m sferd_jax.main" sleep 60'])
  other = subprocess.Popen(['sleep', '60'])
  try:
    pid_file.write_text(f'{other.pid}\n')  # a stale pid file naming a recycled id
    result = _run('tpu_pod.sh', env, 'stop')
    assert result.returncode == 0 and 'nothing running' in result.stdout and other.poll() is None
    pid_file.write_text(f'{ours.pid}\n')
    result = _run('tpu_pod.sh', env, 'stop')
    assert result.returncode == 0 and f'stopped process {ours.pid}' in result.stdout
    assert ours.wait(timeout=10) != 0 and not pid_file.exists()
  finally:
    for process in (ours, other):
      if process.poll() is None:
        process.kill()
        process.wait()


def test_gpu_slurm_runs_one_process_per_node_on_all_its_gpus(sandbox):
  base, _, calls = sandbox
  env = {**base, 'CONFIG': 'configs/tiny.py', 'WORKDIR': '/shared/run', 'SLURM_JOB_ID': '42',
         'SLURM_SUBMIT_DIR': ROOT, 'SLURM_GPUS_ON_NODE': '4', 'SLURM_JOB_NUM_NODES': '2'}
  result = _run('gpu_slurm.sbatch', env, '--config.teacher.batch_size=64')
  assert result.returncode == 0, result.stderr
  assert _read(calls / 'srun.txt').startswith('srun --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m')
  python = _read(calls / 'python.txt')
  assert f'cwd={ROOT}' in python
  assert 'args=-m sferd_jax.main --config=configs/tiny.py --workdir=/shared/run --config.teacher.batch_size=64' \
      in python
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3' in python and 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.90' in python


def test_gpu_local_runs_one_process_and_leaves_multi_host_variables_out(sandbox):
  base, _, calls = sandbox
  env = {**base, 'CONFIG': 'configs/tiny.py', 'WORKDIR': 'runs/x', 'SLURM_NTASKS': '1', 'SLURM_JOB_ID': '7',
         'JAX_COORDINATOR_ADDRESS': 'h:1', 'XLA_PYTHON_CLIENT_MEM_FRACTION': '0.5'}
  result = _run('gpu_local.sh', env, '--mode=sample')
  assert result.returncode == 0, result.stderr
  assert 'JAX backend gpu 8' in result.stdout
  python = _read(calls / 'python.txt')
  assert 'args=-m sferd_jax.main --config=configs/tiny.py --workdir=runs/x --mode=sample' in python
  assert 'SLURM_' not in python and 'JAX_COORDINATOR_ADDRESS' not in python
  assert 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.5' in python


def test_gpu_local_refuses_a_machine_without_gpu(sandbox, tmp_path):
  base, _, calls = sandbox
  cpu_python = _executable(tmp_path / 'cpu_python', '#!/bin/bash\necho "cpu 1"\n')
  result = _run('gpu_local.sh', {**base, 'CONFIG': 'configs/tiny.py', 'WORKDIR': 'runs/x', 'PYTHON': cpu_python})
  assert result.returncode == 2 and 'JAX sees no GPU (cpu 1)' in result.stderr and 'ALLOW_CPU=1' in result.stderr
  assert os.listdir(calls) == []


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
  for name in MULTI_HOST_VARS:
    monkeypatch.delenv(name, raising=False)
  sharding.initialize_distributed()
  assert not jax.distributed.is_initialized()
  assert jax.process_count() == 1 and jax.process_index() == 0


@pytest.mark.parametrize('env, multi', [
    ({}, False),
    ({'SLURM_NTASKS': '4', 'SLURM_JOB_ID': '1'}, False),  # salloc / sbatch before srun: no job step
    ({'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'n1', 'SLURM_PROCID': '0'}, False),
    ({'SLURM_NTASKS': '2', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_PROCID': '1'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '8'}, False),
    ({'OMPI_COMM_WORLD_SIZE': '8', 'OMPI_MCA_orte_hnp_uri': 'x'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.2:8482'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, True),
])
def test_multi_host_environment(env, multi):
  assert sharding.multi_host_environment(env) == multi


def test_initialize_distributed_inside_a_slurm_allocation_without_srun():
  # A fresh process: jax.distributed.initialize() must come before the backend starts.
  env = {k: v for k, v in os.environ.items() if k not in MULTI_HOST_VARS and not k.startswith('SLURM_')}
  env.update(SLURM_NTASKS='1', SLURM_JOB_ID='1', JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  code = ('from sferd_jax import sharding; import jax; sharding.initialize_distributed(); '
          'assert jax.process_count() == 1')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]


# The launchers executed: their commands start real JAX processes on this machine (2 CPU devices each) and train the
# tiny teacher, which must equal the one process of 4 devices of tiny_run (to float32 rounding: gloo sums the
# gradients across the processes in another order).

# srun as SLURM runs a job step: one task per node of the allocation (the script asks --ntasks-per-node=1), each
# with the variables srun gives a task and JAX's SLURM detection reads; --kill-on-bad-exit: a failure ends the rest.
SRUN_LOCAL = r"""#!/bin/bash
echo "srun $*" > "$CALLS/srun.txt"
while [[ "$1" == --* ]]; do shift; done
n=$SLURM_JOB_NUM_NODES
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_NTASKS=$n SLURM_STEP_NODELIST=localhost \
    SLURM_STEP_NUM_NODES=$n SLURM_STEP_TASKS_PER_NODE="1(x$n)" "$@" > "$CALLS/task_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  wait -n || { status=$?; kill "${pids[@]}" 2>/dev/null; }
done
exit $status
"""
# gcloud for a pod of 2 workers on this machine: ssh --worker=all runs the command on each, at once, in the worker's
# own home; JAX_NUM_PROCESSES and JAX_PROCESS_ID stand for what a TPU VM's metadata server tells JAX.
GCLOUD_LOCAL_POD = r"""#!/bin/bash
echo "$*" >> "$CALLS/gcloud.txt"
case "$4" in
  describe) echo 127.0.0.1;;
  ssh)
    for a in "$@"; do [[ "$a" == --command=* ]] && cmd=${a#--command=}; done
    pids=()
    for i in 0 1; do
      HOME=$HOME/worker_$i JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i bash -c "$cmd" > "$CALLS/worker_$i.log" 2>&1 &
      pids+=($!)
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status;;
esac
"""


def _free_port(low=1024, high=65535):
  for port in random.Random(os.getpid()).sample(range(low, high + 1), 200):
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
    return port
  raise RuntimeError('no free port')


def _python_wrapper(path):
  """An executable that runs this interpreter (the launchers call python3 or a venv's python by name)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  return _executable(path, f'#!/bin/bash\nexec {sys.executable} "$@"\n')


def _two_process_env(base):
  """Each process: 2 CPU devices, the tests' compile cache, no network dataset."""
  env = {k: v for k, v in base.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             TFDS_DATA_DIR='/nonexistent-tfds-data-dir-for-tests')
  return env


TEACHER_ONLY = ('--mode=train_teacher', f'--jit_cache={os.path.join(tempfile.gettempdir(), "sferd_jax_test_jit_cache")}')


def _same_teacher(reference, workdir):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
               exports.load(os.path.join(reference, 'teacher')).params,
               exports.load(os.path.join(workdir, 'teacher')).params)


def test_gpu_slurm_executed_under_a_local_srun_trains_as_one_process(sandbox, tmp_path, tiny_run):
  base, _, calls = sandbox
  _executable(tmp_path / 'bin' / 'srun', SRUN_LOCAL)
  _python_wrapper(tmp_path / 'bin' / 'python3')
  workdir = str(tmp_path / 'run')
  # JAX puts the coordinator on the first node, at port 61440 + job id % 4096: a job id whose port is free.
  job_id = _free_port(61440, 65535) - 61440
  env = _two_process_env({**base, 'CONFIG': 'configs/tiny.py', 'WORKDIR': workdir, 'SLURM_JOB_ID': str(job_id),
                          'SLURM_SUBMIT_DIR': ROOT, 'SLURM_GPUS_ON_NODE': '2', 'SLURM_JOB_NUM_NODES': '2'})
  result = _run('gpu_slurm.sbatch', env, *TEACHER_ONLY, timeout=600)
  logs = [_read(calls / f'task_{i}.log') for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  assert 'gpu_slurm.sbatch: job' in result.stdout and '2 nodes x 2 GPUs' in result.stdout
  _same_teacher(tiny_run[0], workdir)
  assert all('teacher: step 4/4' in log for log in logs[:1])  # process 0 logs the progress


def test_tpu_pod_run_executed_on_two_local_workers_trains_as_one_process(sandbox, tmp_path, tiny_run):
  base, home, calls = sandbox
  _executable(tmp_path / 'bin' / 'gcloud', GCLOUD_LOCAL_POD)
  for i in range(2):  # what `setup` leaves on each worker: the checkout and a virtualenv
    worker = home / f'worker_{i}'
    worker.mkdir()
    os.symlink(ROOT, worker / 'sferd_jax')
    _python_wrapper(worker / 'sferd_venv' / 'bin' / 'python')
  workdir = str(tmp_path / 'run')
  env = _two_process_env({**base, 'TPU_NAME': 'local-pod', 'ZONE': 'z', 'PROJECT': 'p', 'CONFIG': 'configs/tiny.py',
                          'WORKDIR': workdir, 'COORDINATOR_PORT': str(_free_port())})
  result = _run('tpu_pod.sh', env, 'run', '--', *TEACHER_ONLY, timeout=600)
  logs = [_read(calls / f'worker_{i}.log') for i in range(2)]
  assert result.returncode == 0, result.stderr + logs[0][-3000:] + logs[1][-3000:]
  _same_teacher(tiny_run[0], workdir)
  assert 'teacher: step 4/4' in logs[0]
