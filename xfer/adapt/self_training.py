"""Self-training: target rows get pseudo-labels from the model itself, and train it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xfer.adapt.base import AdaptationLoss


def centroid_labels(features: torch.Tensor, probs: torch.Tensor, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on the target features, started from the classifier's soft class centroids.

    The classifier is biased towards the source, but the target rows of one
    class still sit together: re-assigning each row to its nearest class
    centroid (cosine, features centred on the target mean) corrects the labels
    near a misplaced boundary (as SHOT does, Liang et al., 2020).
    """
    f = features - features.mean(0, keepdim=True)
    f = F.normalize(f, dim=1)
    centroids = F.normalize(probs.T @ f, dim=1)
    for _ in range(iterations):
        labels = (f @ centroids.T).argmax(1)
        one_hot = F.one_hot(labels, probs.shape[1]).to(f.dtype)
        counts = one_hot.sum(0, keepdim=True).T
        # A class that lost every row keeps its previous centroid.
        centroids = F.normalize(torch.where(counts > 0, one_hot.T @ f, centroids), dim=1)
    similarity = f @ centroids.T
    return similarity.argmax(1), similarity


class PseudoLabelLoss(AdaptationLoss):
    """Cross-entropy of target logits against pseudo-labels, on confident rows only.

    `labelling="confidence"`: a row's label is its own argmax, computed in
    the batch. `labelling="centroid"`: labels are refreshed once per epoch
    over the whole target set (`refresh`) by `centroid_labels`, then looked
    up per batch through `index_t`. Either way only rows whose predicted
    probability for their pseudo-label reaches `threshold` count, and the
    loss is averaged over the whole batch, so few confident rows give a weak
    signal.
    """

    def __init__(self, threshold: float = 0.9, labelling: str = "confidence"):
        super().__init__()
        if labelling not in ("confidence", "centroid"):
            raise ValueError(f"labelling must be 'confidence' or 'centroid', got {labelling!r}")
        self.threshold = threshold
        self.labelling = labelling
        self.register_buffer("pseudo", torch.zeros(0, dtype=torch.long), persistent=False)
        self.last_mask_rate = 0.0

    @property
    def wants_refresh(self) -> bool:
        return self.labelling == "centroid"

    @torch.no_grad()
    def refresh(self, features_t: torch.Tensor, logits_t: torch.Tensor) -> None:
        if self.labelling == "centroid":
            self.pseudo, _ = centroid_labels(features_t, F.softmax(logits_t, 1))

    def forward(self, features_s, features_t, logits_s, logits_t, index_t=None):
        with torch.no_grad():
            probs = F.softmax(logits_t, 1)
            if self.labelling == "centroid":
                if index_t is None or len(self.pseudo) == 0:
                    raise RuntimeError("centroid pseudo-labels need refresh() over the target set, then index_t per batch")
                pseudo = self.pseudo[index_t]
            else:
                pseudo = probs.argmax(1)
            # The model must already give the pseudo-label this probability: a centroid label
            # the classifier finds implausible waits until the classifier moves towards it.
            mask = (probs.gather(1, pseudo[:, None]).squeeze(1) >= self.threshold).float()
        self.last_mask_rate = float(mask.mean())
        return (F.cross_entropy(logits_t, pseudo, reduction="none") * mask).mean()
