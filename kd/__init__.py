"""kd: knowledge distillation for image classification on small, imbalanced datasets.

The library knows nothing of Ray or Optuna: `search/` drives it through a scheme's `fit` (kd.schemes) and its report
callback.
"""

__version__ = "0.1.0"
