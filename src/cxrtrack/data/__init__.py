"""Data: finding the dataset (layout), decoding images, the cached dataset, transforms, synthetic set, download."""
