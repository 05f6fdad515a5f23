"""TrainState and the optimizer that updates it."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a training phase checkpoints. The teacher is not in here: it is an argument of the step."""
  step: jax.Array          # int32 scalar: optimizer updates done
  params: Any
  ema_params: Any          # None when the phase keeps no EMA
  opt_state: Any

  @classmethod
  def create(cls, *, params, tx, ema_decay):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params) if ema_decay > 0 else None)

  @property
  def export_params(self):
    """The parameters a finished phase exports: the EMA when there is one."""
    return self.params if self.ema_params is None else self.ema_params


class ConsistencyState(TrainState):
  """A consistency-distillation state: TrainState plus the target network theta-, an EMA of params (its own decay,
  apart from the exported EMA's). Its own class, so the other phases' checkpoints keep their structure."""
  target_params: Any = None

  @classmethod
  def create(cls, *, params, tx, ema_decay):
    state = super().create(params=params, tx=tx, ema_decay=ema_decay)
    return state.replace(target_params=jax.tree.map(jnp.copy, params))


def learning_rate_schedule(opt_cfg, train_steps):
  """Linear warm-up from 0, then constant or linearly annealed to 0 at train_steps."""
  lr, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
  if opt_cfg.schedule == 'constant':
    after = optax.constant_schedule(lr)
  else:
    after = optax.linear_schedule(lr, 0.0, max(train_steps - warmup, 1))
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt_cfg, train_steps):
  """Adam or AdamW with the schedule above and global-norm clipping."""
  schedule = learning_rate_schedule(opt_cfg, train_steps)
  if opt_cfg.name == 'adamw':
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
  else:
    tx = optax.adam(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
  if opt_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), tx)
  return tx, schedule


def ema_decay_at(step, ema_decay):
  """min(decay, (1 + step) / (10 + step)): the EMA forgets its random initialisation quickly.

  With a constant 0.999 the initial parameters would still weigh 0.999^1000 = 37% after 1000 steps; the warm-up
  (as in the official SFERD code) changes nothing once (1 + step) / (10 + step) exceeds the decay.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def apply_gradients(state, grads, *, tx, ema_decay):
  """One optimizer update (and EMA update) of state."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    decay = ema_decay_at(state.step, ema_decay)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
