"""LogME (You et al., ICML 2021): how much evidence the features give a linear model of the labels.

For each class c, y is its one-hot column (1 on the rows of class c, else 0),
modelled as y = F w + noise with a prior w ~ N(0, I / alpha) and noise
~ N(0, 1 / beta) on each of the n rows. The evidence p(y | F, alpha, beta)
integrates over every w, so it is high only when a *simple* linear map of the
features fits the labels: the prior's volume pays for every direction a fit
leans on, so a wide backbone cannot buy evidence by fitting noise, and no
head is trained and no rows are held out. Per class, with
A = alpha I_D + beta F^T F and the posterior mean m = beta A^-1 F^T y,

    L(alpha, beta) = n/2 log beta + D/2 log alpha - n/2 log 2 pi
                     - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log |A|

maximised over (alpha, beta) by the paper's fixed point (MacKay's evidence
approximation): with gamma = sum_i beta s_i^2 / (alpha + beta s_i^2), the
number of directions the data pin down,

    alpha <- gamma / m^T m        beta <- (n - gamma) / ||F m - y||^2

With the thin SVD F = U diag(s) V^T (k = min(n, D) singular values) and
z = U^T y, every term is a sum over k:

    m^T m         = sum (beta s_i z_i / (alpha + beta s_i^2))^2
    ||F m - y||^2 = sum (alpha z_i / (alpha + beta s_i^2))^2 + ||y||^2 - ||z||^2
    log |A|       = sum log(alpha + beta s_i^2) + (D - k) log alpha

so D/2 log alpha - 1/2 log |A| = k/2 log alpha - 1/2 sum log(alpha + beta s_i^2):
the evidence reads F only through F F^T. Rotating the features or padding
them with zero columns changes nothing, and n < D needs no special case.

LogME = the mean over classes of max L / n (per row, so it compares across
dataset sizes as well as backbones).
"""

from __future__ import annotations

import numpy as np

from xfer.transferability.base import Features, capped

MAX_ITERATIONS = 1000
RELATIVE_TOLERANCE = 1e-10  # stop once alpha and beta both move less than this, relatively
# alpha and beta are kept in [1 / BOUND, BOUND]: the maximum can lie at infinity, where the evidence
# tends to a finite limit (alpha -> infinity when the features explain nothing of y, so no weights at
# all fit best; beta -> infinity when F can fit y exactly, n <= D), and the iteration must stop somewhere.
BOUND = 1e12
TINY = 1e-300  # a floor under divisors that can reach 0 (a perfect fit, or no weights at all)


def log_evidence(s: np.ndarray, z: np.ndarray, outside: float, n: int, alpha: float, beta: float) -> float:
    """L(alpha, beta) of one column y, from F's singular values `s`, z = U^T y and `outside` = ||y||^2 - ||z||^2."""
    shrink = alpha + beta * s**2
    weights_sq = float(np.sum((beta * s * z / shrink) ** 2))  # m^T m
    residual = float(np.sum((alpha * z / shrink) ** 2)) + outside  # ||F m - y||^2
    return (
        n / 2 * np.log(beta)
        + len(s) / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * weights_sq
        - float(np.sum(np.log(shrink))) / 2
    )


def maximise_evidence(s: np.ndarray, z: np.ndarray, outside: float, n: int) -> tuple[float, float]:
    """(alpha, beta) at the fixed point of the evidence updates, from alpha = beta = 1 (the paper's start)."""
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        shrink = alpha + beta * s**2
        gamma = float(np.sum(beta * s**2 / shrink))
        weights_sq = float(np.sum((beta * s * z / shrink) ** 2))
        residual = float(np.sum((alpha * z / shrink) ** 2)) + outside
        # No weights at all (y orthogonal to every feature direction): alpha is free, keep it.
        new_alpha = gamma / weights_sq if weights_sq > TINY else alpha
        new_beta = (n - gamma) / max(residual, TINY)
        new_alpha, new_beta = np.clip([new_alpha, new_beta], 1 / BOUND, BOUND)
        converged = abs(new_alpha - alpha) <= RELATIVE_TOLERANCE * alpha and abs(new_beta - beta) <= RELATIVE_TOLERANCE * beta
        alpha, beta = float(new_alpha), float(new_beta)
        if converged:
            break
    return alpha, beta


def class_log_evidence(u: np.ndarray, s: np.ndarray, y: np.ndarray) -> float:
    """max L / n for one one-hot column y, given the thin SVD (u, s) of the features."""
    z = u.T @ y
    outside = max(float(y @ y - z @ z), 0.0)  # rounding can take it a hair below 0
    alpha, beta = maximise_evidence(s, z, outside, len(y))
    return log_evidence(s, z, outside, len(y), alpha, beta) / len(y)


def logme(features: Features, seed: int) -> float:
    """Mean over the source classes of the maximised log evidence per row of a linear model on the features."""
    f = capped(features, seed)
    u, s, _ = np.linalg.svd(f.source, full_matrices=False)  # one SVD serves every class
    labels = f.source_labels
    return float(np.mean([class_log_evidence(u, s, (labels == c).astype(np.float64)) for c in np.unique(labels)]))
