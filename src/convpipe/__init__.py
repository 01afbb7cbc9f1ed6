"""convpipe: reproducible CNN image classification with Lightning, DVC, MLflow and Optuna."""

__version__ = "0.1.0"
