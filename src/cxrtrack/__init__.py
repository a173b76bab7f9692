"""cxrtrack: train CustomCXRNet on chest X-rays and track it in MLflow and/or Weights & Biases."""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("COVID-19", "Normal", "Viral Pneumonia")
"""The fixed class order: label i is CLASS_NAMES[i] in every split, checkpoint and tracker."""

IMAGE_SIZE_RANGE: tuple[int, int] = (32, 512)
"""Input sizes CustomCXRNet accepts (pixels, square). 32 is the least that survives its four 2x poolings;
above 512 the dense layer alone passes 16 M parameters (4096 px would need 1 billion). Tested: 64, 128, 224, 256."""
