"""cxrtrack: train CustomCXRNet on chest X-rays and track it in MLflow and/or Weights & Biases."""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Normal", "Viral Pneumonia")
"""The fixed class order: label i is CLASS_NAMES[i] in every split, checkpoint and tracker."""
