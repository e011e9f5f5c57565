"""Datasets: builtin generators, image folders, manifests and splits."""
