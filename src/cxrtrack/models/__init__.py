from cxrtrack.models.cxrnet import SUPPORTED_SIZES, CustomCXRNet, build_model

__all__ = ["SUPPORTED_SIZES", "CustomCXRNet", "build_model"]
