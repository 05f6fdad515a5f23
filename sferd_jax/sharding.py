"""One code path for 1 CPU, 8 GPUs or a TPU pod: jit over a ('data',) mesh, batch sharded, the rest replicated.

Batches arrive as host-local NumPy arrays (each process holds its slice of the global batch) with a leading
steps-per-call axis: (K, local_batch, ...). They are sharded on their batch axis.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sferd_jax import errors


def multi_host_environment(env):
  """Whether env describes one process of a multi-process job that jax.distributed.initialize() can join.

  Explicit: JAX_COORDINATOR_ADDRESS (launch/tpu_pod.sh sets it). Detected: a SLURM job step (srun) of several
  tasks, an Open MPI job of several ranks, GKE TPU or multislice variables. A bare SLURM allocation (salloc, or an
  sbatch script before srun) is not one: JAX's SLURM detection needs a job step.
  """
  return ('JAX_COORDINATOR_ADDRESS' in env
          or ('SLURM_STEP_NODELIST' in env and 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1)
          or ('OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1)
          or 'TPU_WORKER_HOSTNAMES' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env)


def initialize_distributed():
  """Joins a multi-host job (TPU pods, SLURM/MPI GPU clusters); a no-op on one host.

  JAX finds the process count and this process's id itself on TPU VMs, SLURM and Open MPI. Elsewhere (processes
  started by hand or by another scheduler) set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID in each process's environment."""
  import os  # pylint: disable=g-import-not-at-top
  if multi_host_environment(os.environ) and not jax.distributed.is_initialized():
    use_gloo_on_cpu()
    given = {key: int(os.environ[name]) for key, name in (('num_processes', 'JAX_NUM_PROCESSES'),
                                                          ('process_id', 'JAX_PROCESS_ID')) if name in os.environ}
    jax.distributed.initialize(**given)


def on_process_zero(fn, *, what):
  """fn() on process 0 alone (a writer, a lock, the evaluation), with its outcome shared: when fn raises there,
  every other process raises OtherProcessError with its message at once, rather than waiting in the next collective
  until JAX's heartbeat timeout ends it with no reason given. Returns fn()'s result on process 0, None elsewhere."""
  if jax.process_count() == 1:
    return fn()
  result, error, message = None, None, np.zeros(_MESSAGE_BYTES, np.uint8)
  if jax.process_index() == 0:
    try:
      result = fn()
    except BaseException as e:  # pylint: disable=broad-except  (re-raised below, after the others are told)
      error = e
      text = f'{what} failed on process 0: {e}'.encode()[:_MESSAGE_BYTES - 1]
      message[0], message[1:1 + len(text)] = 1, np.frombuffer(text, np.uint8)
  shared = np.asarray(multihost_utils.broadcast_one_to_all(message))  # also the barrier: all wait for process 0
  if error is not None:
    raise error
  if shared[0]:
    raise errors.OtherProcessError(bytes(shared[1:]).rstrip(b'\0').decode(errors='replace'))
  return result


_MESSAGE_BYTES = 2048  # an error message, as bytes, broadcast from process 0


def use_gloo_on_cpu():
  """CPU processes need gloo for collectives across processes (GPUs and TPUs have their own); call it before
  jax.distributed.initialize. A JAX without the option has no CPU collectives to choose."""
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except (AttributeError, KeyError, ValueError):
    pass


def make_mesh(devices=None):
  """A 1-D ('data',) mesh. Auto axes: shardings live on jit's boundaries, not in array types (jax.make_mesh's
  default in JAX >= 0.7 is Explicit, which would make every traced shape carry its sharding)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, *, leading_axes=1):
  """Shards axis `leading_axes` (the batch axis after the steps-per-call axis) over 'data'."""
  return NamedSharding(mesh, P(*([None] * leading_axes), 'data'))


def check_batch_size(global_batch_size, mesh, *, what='batch_size'):
  """A global batch splits evenly over the mesh's devices, or ConfigError (a ValueError) saying what to set."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise errors.ConfigError(f'{what}={global_batch_size} must be divisible by the number of devices ({n}); '
                             f'use a multiple of {n}')


def put_batch(local_batch, mesh, *, leading_axes=1):
  """Host-local arrays (K, local_batch, ...) -> global jax.Arrays sharded over the batch axis."""
  sharding = batch_sharding(mesh, leading_axes=leading_axes)

  def put(x):
    x = np.asarray(x)
    global_shape = list(x.shape)
    global_shape[leading_axes] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

  return jax.tree.map(put, local_batch)


def put_replicated(tree, mesh):
  """Every leaf replicated over mesh; each process passes the same values. In a multi-process job each leaf is
  assembled from the processes' copies (device_put reaches only this process's devices); global arrays pass."""
  sharding = replicated(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already global
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(put, tree)


def host_local(tree):
  """Replicated global arrays -> this process's own copy, so one process can use them alone (e.g. to sample a
  grid on its local devices while the others wait)."""
  return jax.tree.map(lambda x: x if not isinstance(x, jax.Array) or x.is_fully_addressable
                      else x.addressable_data(0), tree)


def jit_step(step, mesh, *, num_extra_args=0):
  """jit(step)(state, batches, rng, *extra): state donated and replicated, batches sharded."""
  rep = replicated(mesh)
  return jax.jit(step, in_shardings=(rep, batch_sharding(mesh), rep) + (rep,) * num_extra_args,
                 out_shardings=(rep, rep), donate_argnums=(0,))
