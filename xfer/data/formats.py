"""Which files are images: a module of its own so that listing a dataset never imports torch."""

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
