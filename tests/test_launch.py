"""launch/: the scripts parse, refuse to start without their required variables (before touching gcloud or srun),
and hand the right command and environment to stub gcloud / srun / python; initialize_distributed() is a no-op on
one host. Nothing here reaches a cloud or a cluster."""

import os
import stat
import subprocess
import sys

import jax
import pytest

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


def _run(script, env, *args):
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], env=env, capture_output=True, text=True,
                        timeout=60, cwd=ROOT, check=False)


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
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p', 'CONFIG': 'configs/tiny.py',
                    'WORKDIR': 'gs://bucket/run'}, 'gs:// paths are not supported'),
    ('tpu_pod.sh', {'TPU_NAME': 'pod', 'ZONE': 'z', 'PROJECT': 'p', 'CONFIG': 'configs/tiny.py', 'WORKDIR': 'runs/x'},
     'must be an absolute path'),
    ('gpu_slurm.sbatch', {}, 'set CONFIG'),
    ('gpu_slurm.sbatch', {'CONFIG': 'configs/tiny.py'}, 'set WORKDIR'),
    ('gpu_slurm.sbatch', {'CONFIG': 'configs/tiny.py', 'WORKDIR': 'gs://b/run'}, 'gs:// paths are not supported'),
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
         'WORKDIR': '/mnt/shared/run one', 'TFDS_DATA_DIR': '/mnt/shared/tfds'}
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
  assert 'install -q jax[tpu]==' in pip and f'-e {home}/sferd_jax[data]' in pip
  # Run: every worker starts the same command, with the coordinator on worker 0, arguments intact.
  python = _read(calls / 'python.txt')
  assert f'cwd={home}/sferd_jax' in python
  assert ("args=-m sferd_jax.main --config=configs/tiny.py --workdir=/mnt/shared/run one --config.seed=3 "
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
