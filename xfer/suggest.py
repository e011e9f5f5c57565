"""Which unlabelled target images to label first: diverse and uncertain.

When no label-free choice can be trusted, a few target labels help most.
`suggest_labels` picks `n` unlabelled target rows for a person to label:
k-means with k = n on the frozen backbone's features (in a PCA projection)
splits the pool into n groups of look-alike images, so the picks cover the
target's modes instead of piling up where the head is worst; in each group
the row the current head is least sure of (highest predictive entropy) is
taken, since its label corrects the head where it errs; and the picks are
ordered most uncertain first, so a person who stops early has labelled the
most useful ones. `xfer suggest-labels` writes them to a CSV a person fills
in; `data.split.target_labels` reads it back as the labelled target budget.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from xfer.validators.base import PCA_DIMS, entropy_rows, pca_for


def project(features: np.ndarray, seed: int, dims: int = PCA_DIMS) -> np.ndarray:
    """The first `dims` principal components of `features` (fewer when there are fewer rows)."""
    x = np.asarray(features, dtype=np.float64)
    pca = pca_for(x, seed, dims)
    return x if pca is None else pca.fit_transform(x)


# Which row of a cluster is suggested: the most uncertain (the default), or the most typical.
WITHIN = ("uncertain", "centre")


def suggest_labels(target_features: np.ndarray, probabilities: np.ndarray, n: int, seed: int = 0, within: str = "uncertain") -> np.ndarray:
    """Indices of `n` rows of the unlabelled target pool to label, most useful first.

    `target_features` (rows, dim): the pool's backbone features; `probabilities`
    (rows, classes): the current head's predictions on the same rows. One row per
    k-means cluster (k = n): the cluster's most uncertain row (ties: the one
    nearest its centre, then the lower index); then most uncertain first.
    Clusters k-means leaves empty (fewer distinct rows than n) are made up by
    the most uncertain rows not yet taken. The same inputs and seed give the
    same indices. `within="centre"` takes each cluster's row nearest its centre
    instead (a typical image; benchmarks/suggest_labels.py compares the two).
    """
    x = np.asarray(target_features)
    p = np.asarray(probabilities)
    if x.ndim != 2 or p.ndim != 2 or len(x) != len(p):
        raise ValueError(f"target_features {x.shape} and probabilities {p.shape} must be 2-D with one row each per image")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= len(x):
        raise ValueError(f"n must be an integer from 1 to the {len(x)} unlabelled target rows, got {n!r}")
    if within not in WITHIN:
        raise ValueError(f"within must be one of {WITHIN}, got {within!r}")
    uncertainty = entropy_rows(p)
    if n == len(x):
        return np.lexsort((np.arange(len(x)), -uncertainty))
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    z = project(x, seed)
    with warnings.catch_warnings():
        # Fewer distinct rows than n: the empty clusters are made up below.
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=n, n_init=3, random_state=seed).fit(z)
    distance = np.linalg.norm(z - km.cluster_centers_[km.labels_], axis=1)
    picks = []
    for cluster in range(n):
        members = np.flatnonzero(km.labels_ == cluster)
        if len(members):
            # lexsort: the last key sorts first. Most uncertain, then nearest the centre, then lowest index.
            keys = (members, distance[members], -uncertainty[members]) if within == "uncertain" else (members, distance[members])
            picks.append(members[np.lexsort(keys)[0]])
    if len(picks) < n:
        rest = np.setdiff1d(np.arange(len(x)), picks)
        picks.extend(rest[np.lexsort((rest, -uncertainty[rest]))][: n - len(picks)])
    picks = np.asarray(picks, dtype=np.int64)
    return picks[np.lexsort((picks, -uncertainty[picks]))]


# The file `xfer suggest-labels` writes: `label` is left empty for a person to fill
# with a class name; `predicted` is the current head's guess, a hint only.
SUGGESTION_COLUMNS = ("path", "suggested_rank", "predicted", "label")


class SuggestError(ValueError):
    """The project cannot give suggestions (a stage's output is missing or stale), or N is out of range."""


def suggestions(manifest_path: Path, features_dir: Path, head_dir: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """The `n` unlabelled target images to label first, as the frame `xfer suggest-labels` writes.

    Reads the split's manifest, the features stage's current features and the
    head stage's head, and checks they belong together (else: which stage to run).
    """
    from xfer.data.split import class_names, read_manifest
    from xfer.features import load_current
    from xfer.heads import load_head, predict_proba

    manifest = read_manifest(manifest_path)
    fs = load_current(features_dir)
    head, spec = load_head(head_dir)
    if fs.index.path.tolist() != manifest.path.tolist() or fs.index.split.tolist() != manifest.split.tolist():
        raise SuggestError(f"the features in {features_dir} were computed for another manifest than {manifest_path}: run the features stage")
    if spec.get("features_key") != fs.meta.get("key"):
        raise SuggestError(f"the head in {head_dir} was trained on other features than {features_dir} holds: run the head stage")
    names = class_names(manifest)
    if spec.get("class_names") != names:
        raise SuggestError(f"the head in {head_dir} has classes {spec.get('class_names')}, the manifest {names}: run the head stage")
    pool = ((fs.index.role == "target") & (fs.index.split == "unlabeled")).to_numpy()
    if not pool.any():
        raise SuggestError(f"{manifest_path} has no unlabelled target images to suggest")
    x = np.asarray(fs.features[pool], dtype=np.float32)
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= len(x):
        raise SuggestError(f"N {n}: the project has {len(x)} unlabelled target images; ask for 1 to {len(x)}")
    probs = predict_proba(head, x, "target")
    picks = suggest_labels(x, probs, int(n), seed)
    return pd.DataFrame(
        {
            "path": fs.index.path.to_numpy()[pool][picks],
            "suggested_rank": np.arange(1, len(picks) + 1),
            "predicted": np.asarray(names)[probs[picks].argmax(1)],
            "label": "",
        },
        columns=list(SUGGESTION_COLUMNS),
    )
