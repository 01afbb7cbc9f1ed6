"""convpipe: reproducible CNN image classification with Lightning, DVC, MLflow and Optuna."""

__version__ = "0.1.0"

import os

# albumentations asks PyPI for a newer version on import; convpipe must never touch the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
