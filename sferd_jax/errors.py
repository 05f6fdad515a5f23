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


class DataError(ValueError):
  """A data file that cannot be used (wrong dtype or shape, no images, bad labels, unreadable); the message names the
  file and the defect."""


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not on disk; the message says how to put it there (sferd_jax never downloads)."""


class RunLockedError(RuntimeError):
  """Another process is running in the same run folder."""


class OtherProcessError(RuntimeError):
  """Process 0 of a multi-host job failed at something it does alone; the message is its error."""


USER_ERRORS = (ConfigError, CheckpointError, IncompatibleRunError, TrainingDivergedError, DataError,
               DatasetNotFoundError, RunLockedError, OtherProcessError)
USER_ERROR_EXIT_CODE = 2  # as argparse and absl's flag errors: the command line or its inputs need a change
