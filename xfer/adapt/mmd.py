"""Multi-kernel MMD (Long et al., DAN, 2015): a kernel two-sample distance between domains."""

from __future__ import annotations

import torch

from xfer.adapt.base import AdaptationLoss


class MultiKernelMMD(AdaptationLoss):
    """Biased squared MMD with a sum of Gaussian kernels.

    Bandwidths are `multipliers` times the batch's mean squared distance
    (detached), so the kernels suit whatever scale the features have and
    no bandwidth needs tuning.
    """

    aligns_features = True

    def __init__(self, multipliers: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)):
        super().__init__()
        self.multipliers = tuple(multipliers)

    def forward(self, features_s, features_t, logits_s=None, logits_t=None, index_t=None):
        x = torch.cat([features_s, features_t])
        # ||a||^2 + ||b||^2 - 2 a.b: torch.cdist's backward is far slower on the CPU.
        norms = x.pow(2).sum(1)
        sq = (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp_min(0)
        n = len(x)
        base = sq.detach().sum() / max(n * n - n, 1)
        kernel = sum(torch.exp(-sq / (base * m).clamp_min(1e-8)) for m in self.multipliers)
        ns = len(features_s)
        k_ss, k_tt, k_st = kernel[:ns, :ns], kernel[ns:, ns:], kernel[:ns, ns:]
        return k_ss.mean() + k_tt.mean() - 2 * k_st.mean()
