"""ClassAMI (Musgrave et al., 2022): do the predictions follow the target's own cluster structure?

k-means (k = the number of classes) on the target rows' backbone features
(their leading principal components),
then the adjusted mutual information between cluster and predicted class.
"""

from __future__ import annotations

import numpy as np

from xfer.validators.base import Evidence, Outputs, per_candidate


def cluster_target(e: Evidence) -> np.ndarray:
    from sklearn.cluster import KMeans

    x = e.projection(e.target_features)
    return KMeans(n_clusters=min(e.classes, len(x)), n_init=4, random_state=e.seed).fit_predict(x)


@per_candidate
def class_ami(c: Outputs, e: Evidence) -> float:
    """Adjusted mutual information between target clusters and predicted classes."""
    from sklearn.metrics import adjusted_mutual_info_score

    return float(adjusted_mutual_info_score(e.target_clusters, c.target.argmax(1)))
