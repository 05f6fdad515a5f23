"""The errors that are the user's to fix. Every layer may raise them; the CLI prints their message without a
traceback. Each message says what to change."""


class ConfigError(ValueError):
  """A config that cannot work; the message says which key to change and how."""


class CheckpointError(RuntimeError):
  """A checkpoint or exported model that cannot be used; the message says what to do."""


class IncompatibleRunError(RuntimeError):
  """The workdir holds a run started with settings this run cannot continue."""


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not on disk; the message says how to put it there (sferd_jax never downloads)."""


USER_ERRORS = (ConfigError, CheckpointError, IncompatibleRunError, TrainingDivergedError, DatasetNotFoundError)
