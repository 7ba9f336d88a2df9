"""mixsd_edit: MixSD (Mixed Contextual Self-Distillation) as a knowledge-editing method.

Layers (imports point down this list only):
  data (requests, loaders) -> models / hparams / weights / prompting -> methods (one folder each)
  -> evaluation (metrics) -> editor -> cli / benchmarks.
Importing the package seeds no RNG and writes no file.
"""
__version__ = "0.1.0"
