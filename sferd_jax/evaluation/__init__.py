"""evaluation: feature extractors, FID/KID/IS, the evaluate mode and the fitting-error analysis.

  inception.py      the TF-2015 FID InceptionV3 in Flax (weights from export_inception.py's .npz)
  classifier.py     a small classifier trained on the run's dataset: the weight-free feature extractor
  metrics.py        FID, KID, IS and reference-statistics files
  evaluate.py       run_evaluate: seeded, resumable sampling rounds -> results.json / results.md
  fitting_error.py  run_analysis: bias/variance maps vs attention mass maps (SFERD.md §5)
"""
