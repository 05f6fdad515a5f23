"""Where everything of a run lives under its folder (--workdir). Every reader and writer of a run asks here.

  teacher/                     checkpoints/, samples/, metrics.jsonl, summary.json, model/ (the exported teacher)
  distill/stage_<k>/           the same, per distillation stage; model/ is the stage's student, stage k+1's teacher
  distill/stage_<k>/semantic/  E_phi and G_tau trained on that stage's frozen student (model/ is their export)
  distill/stage_<k>/latent/    the latent diffusion over E_phi's codes (model/: its params and the code statistics)
  distill/stages.{json,md}     the stage table: student steps, final loss, wall time, images/s
  consistency/                 consistency distillation of the teacher (model/: the consistency model), and its
                               semantic/ and latent/ when config.consistency.semantic
  samples/                     the teacher's and each student's samples side by side; the sample mode's output
  evaluate/                    FID/KID/IS rounds and tables
  analyze/                     the fitting-error analysis

An export (a phase folder's model/) is finished when its model.json exists: it is written last.
"""

import dataclasses
import os
import re

from sferd_jax import files

MODEL_JSON = 'model.json'
EXPORT = 'model'  # a phase folder's export subfolder
SEMANTIC, LATENT = 'semantic', 'latent'  # a stage folder's predictor phases


def is_exported(path):
  """Whether `path` holds a finished export (its model.json is written last)."""
  return files.exists(os.path.join(path, MODEL_JSON))


def export_of(phase_dir):
  """The export folder of a phase folder."""
  return os.path.join(phase_dir, EXPORT)


@dataclasses.dataclass(frozen=True)
class RunLayout:
  """The folders and files of one run folder; paths only, nothing is created or read except by finished_stages.
  RunLayout('') gives the paths relative to a run folder."""
  workdir: str

  @property
  def teacher_dir(self):
    return os.path.join(self.workdir, 'teacher')

  @property
  def distill_dir(self):
    return os.path.join(self.workdir, 'distill')

  @property
  def samples_dir(self):
    return os.path.join(self.workdir, 'samples')

  @property
  def evaluate_dir(self):
    return os.path.join(self.workdir, 'evaluate')

  @property
  def classifier_dir(self):
    """The evaluation's feature classifier, trained once per run folder."""
    return os.path.join(self.evaluate_dir, 'classifier')

  @property
  def analyze_dir(self):
    return os.path.join(self.workdir, 'analyze')

  @property
  def stage_table(self):
    """The stage table's path without its extension (.json and .md are written)."""
    return os.path.join(self.distill_dir, 'stages')

  @property
  def consistency_dir(self):
    return os.path.join(self.workdir, 'consistency')

  @property
  def consistency_model(self):
    return export_of(self.consistency_dir)

  def stage_dir(self, stage):
    return os.path.join(self.distill_dir, f'stage_{stage}')

  def semantic_dir(self, stage):
    return os.path.join(self.stage_dir(stage), SEMANTIC)

  def latent_dir(self, stage):
    return os.path.join(self.stage_dir(stage), LATENT)

  @property
  def teacher_model(self):
    return export_of(self.teacher_dir)

  def stage_model(self, stage):
    return export_of(self.stage_dir(stage))

  def semantic_model(self, stage):
    return export_of(self.semantic_dir(stage))

  def latent_model(self, stage):
    return export_of(self.latent_dir(stage))

  def finished_stages(self):
    """[(stage, its export)] of every exported distillation stage, in stage order."""
    names = files.listdir(self.distill_dir)
    stages = [int(m.group(1)) for m in map(re.compile(r'stage_(\d+)').fullmatch, names) if m]
    return [(k, self.stage_model(k)) for k in sorted(stages) if is_exported(self.stage_model(k))]

  def finished_models(self):
    """The exported teacher (when there is one), every exported stage, then the consistency model: the models a
    run has made."""
    teacher = [self.teacher_model] if is_exported(self.teacher_model) else []
    consistency = [self.consistency_model] if is_exported(self.consistency_model) else []
    return teacher + [path for _, path in self.finished_stages()] + consistency


def predictor_dirs(student_dir):
  """(semantic phase folder, latent phase folder) of a student's phase folder (a stage's, the consistency model's)."""
  return os.path.join(student_dir, SEMANTIC), os.path.join(student_dir, LATENT)


def predictor_exports(student_dir):
  """(semantic export, latent export) of a student's phase folder: its predictor and the latent model of its codes,
  which load() brings along with the student."""
  return tuple(export_of(d) for d in predictor_dirs(student_dir))
