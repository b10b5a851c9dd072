"""Classic (non-deep) hashing of feature matrices: LSH, PCAH, ITQ, SH, SDH behind one fit/encode interface.

Every method maps features (N, D) to real outputs (N, K) whose signs are the code (bit = output > 0,
packed by ``codes.pack_signs``). Unsupervised methods centre the features with the training mean;
``fit`` is deterministic given ``seed``. References:
- LSH: random Gaussian projections of centred features (Charikar 2002), as defined in ``lsh.py``.
- PCAH: the top-K principal directions.
- ITQ: PCA then an orthogonal rotation minimising quantisation loss, 50 iterations (Gong & Lazebnik 2011).
- SH: spectral hashing, sinusoidal eigenfunctions along principal directions (Weiss et al. 2008).
- SDH: supervised discrete hashing on RBF anchor features, discrete cyclic coordinate descent
  (Shen et al. 2015), with the parameters of the authors' demo (λ=1, ν=1e-5, ridge 1e-2, 5 iterations).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from hashing_models.codes import pack_signs
from hashing_models.lsh import lsh_projection

# Rows per encode block: 4,096 × 4,096-dim float64 is 128 MB at most, SDH's RBF block (4,096 × 1,000) 32 MB.
ENCODE_BLOCK_ROWS = 4096


def _check_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def _principal_directions(centred: np.ndarray, k: int) -> np.ndarray:
    """Top-k eigenvectors (D, k) of the covariance, largest first, each signed so that its
    largest-magnitude entry is positive (eigh's signs are arbitrary; codes must be reproducible)."""
    covariance = centred.T @ centred / max(1, centred.shape[0] - 1)  # (D, D)
    _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    top = vectors[:, ::-1][:, :k]
    signs = np.sign(top[np.abs(top).argmax(axis=0), np.arange(k)])
    return top * signs


def _sign(x: np.ndarray) -> np.ndarray:
    """±1 with the packing rule: > 0 → +1, otherwise −1."""
    return np.where(x > 0, 1.0, -1.0)


class HashingBaseline:
    """Common interface: ``fit(features, labels=None) -> self``, ``project``, ``encode``."""

    name: ClassVar[str]
    supervised: ClassVar[bool] = False

    def __init__(self, bits: int, seed: int = 0):
        if bits < 8 or bits % 8:
            raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
        self.bits, self.seed = bits, seed
        self.mean_: np.ndarray | None = None  # (D,) training mean; None until fit

    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> HashingBaseline:
        x = _check_features(features)
        if self.supervised and labels is None:
            raise ValueError(f"{self.name} is supervised: fit needs labels")
        self.mean_ = x.mean(axis=0)
        self._fit(x - self.mean_, labels)
        return self

    def project(self, features: np.ndarray) -> np.ndarray:
        """Real outputs (N, K) whose signs are the code."""
        if self.mean_ is None:
            raise RuntimeError(f"{self.name}: call fit before project/encode")
        x = _check_features(features)
        if x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"{self.name} was fitted on {self.mean_.shape[0]}-dim features, got {x.shape[1]}-dim")
        return self._project(x - self.mean_)

    def encode(self, features: np.ndarray) -> np.ndarray:
        """Packed codes (N, K/8) uint8, in row blocks so that a database-sized float32 input is
        never copied to float64 whole."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"features must be an (N, D) matrix, got shape {features.shape}")
        blocks = [pack_signs(self.project(features[start : start + ENCODE_BLOCK_ROWS]))
                  for start in range(0, len(features), ENCODE_BLOCK_ROWS)]
        return np.concatenate(blocks) if blocks else np.zeros((0, self.bits // 8), dtype=np.uint8)

    def _fit(self, centred: np.ndarray, labels: np.ndarray | None) -> None:
        raise NotImplementedError

    def _project(self, centred: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_pca_bits(self, dim: int) -> None:
        if self.bits > dim:
            raise ValueError(f"{self.name} uses {self.bits} principal directions but features have only {dim} dims")


class LSH(HashingBaseline):
    """sign((x − training mean) · P): the definition of ``lsh.py``, shared with the served untrained model."""

    name = "lsh"

    def _fit(self, centred, labels):
        self.projection_ = lsh_projection(centred.shape[1], self.bits, self.seed)  # (D, K)

    def _project(self, centred):
        return centred @ self.projection_


class PCAH(HashingBaseline):
    name = "pcah"

    def _fit(self, centred, labels):
        self._check_pca_bits(centred.shape[1])
        self.projection_ = _principal_directions(centred, self.bits)  # (D, K)

    def _project(self, centred):
        return centred @ self.projection_


class ITQ(HashingBaseline):
    name = "itq"

    def __init__(self, bits: int, seed: int = 0, iterations: int = 50):
        super().__init__(bits, seed)
        self.iterations = iterations

    def _fit(self, centred, labels):
        self._check_pca_bits(centred.shape[1])
        pca = _principal_directions(centred, self.bits)  # (D, K)
        v = centred @ pca  # (N, K)
        rotation, _ = np.linalg.qr(np.random.default_rng(self.seed).standard_normal((self.bits, self.bits)))
        for _ in range(self.iterations):
            # Fix B = sign(VR); the best orthogonal R is the Procrustes solution of min ||B - VR||.
            u, _, vt = np.linalg.svd(_sign(v @ rotation).T @ v)  # (K, K)
            rotation = vt.T @ u.T
        self.projection_ = pca @ rotation

    def _project(self, centred):
        return centred @ self.projection_


class SH(HashingBaseline):
    name = "sh"

    def _fit(self, centred, labels):
        n_pca = min(self.bits, centred.shape[1])
        self.directions_ = _principal_directions(centred, n_pca)  # (D, P)
        z = centred @ self.directions_
        eps = np.finfo(np.float64).eps
        self.low_ = z.min(axis=0) - eps
        spread = z.max(axis=0) + eps - self.low_  # (P,) range along each direction
        # Candidate modes: frequency m = 1..max_mode[j]-1 along direction j, eigenvalue ∝ (m π / spread_j)²;
        # keep the K smoothest (smallest eigenvalue), ties in direction order as in the authors' code.
        max_mode = np.ceil((self.bits + 1) * spread / spread.max()).astype(int)
        dims = np.concatenate([np.full(m - 1, j) for j, m in enumerate(max_mode)])
        freqs = np.concatenate([np.arange(1, m) for m in max_mode])
        omegas = freqs * np.pi / spread[dims]
        keep = np.argsort(omegas**2, kind="stable")[: self.bits]
        if len(keep) < self.bits:
            raise ValueError(f"{self.name}: features give only {len(keep)} modes for {self.bits} bits")
        self.mode_dims_, self.mode_omegas_ = dims[keep], omegas[keep]  # (K,), (K,)

    def _project(self, centred):
        z = centred @ self.directions_ - self.low_  # (N, P)
        # The eigenfunction sin(π/2 + ω z) = cos(ω z) along the mode's single direction.
        return np.cos(z[:, self.mode_dims_] * self.mode_omegas_)


class SDH(HashingBaseline):
    name = "sdh"
    supervised = True

    def __init__(self, bits: int, seed: int = 0, anchors: int = 1000, sigma: float | None = None,
                 iterations: int = 5, inner_iterations: int = 5, lam: float = 1.0, nu: float = 1e-5,
                 ridge: float = 1e-2):
        super().__init__(bits, seed)
        self.n_anchors, self.sigma = anchors, sigma  # sigma None: mean distance of training points to anchors
        self.iterations, self.inner_iterations = iterations, inner_iterations
        self.lam, self.nu, self.ridge = lam, nu, ridge  # G-step ridge, F-term weight, F-step ridge

    def _squared_distances(self, centred: np.ndarray) -> np.ndarray:
        """(N, M) squared Euclidean distances to the anchors; memory N·M·8 bytes."""
        sq = (centred**2).sum(1)[:, None] + (self.anchors_**2).sum(1)[None, :] - 2.0 * centred @ self.anchors_.T
        return np.maximum(sq, 0.0)

    def _rbf(self, centred: np.ndarray) -> np.ndarray:
        return np.exp(-self._squared_distances(centred) / (2.0 * self.sigma_**2))

    def _fit(self, centred, labels):
        y = _label_matrix(labels, centred.shape[0])  # (N, C)
        rng = np.random.default_rng(self.seed)
        n = centred.shape[0]
        self.anchors_ = centred[np.sort(rng.choice(n, size=min(self.n_anchors, n), replace=False))]
        if self.sigma is None:
            self.sigma_ = float(np.sqrt(self._squared_distances(centred)).mean()) or 1.0  # 1.0: all points equal
        else:
            self.sigma_ = float(self.sigma)
        phi = self._rbf(centred)
        self.phi_mean_ = phi.mean(axis=0)
        phi -= self.phi_mean_

        def ridge(a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:  # argmin_W ||b - aW||² + lam||W||²
            return np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ b)

        b = _sign(rng.standard_normal((n, self.bits)))  # (N, K) ±1
        projection = ridge(phi, b, self.ridge)  # (M, K): F(x) = φ(x) P
        for _ in range(self.iterations):
            w = ridge(b, y, self.lam)  # (K, C) G-step: classifier on the codes
            b = self._discrete_cyclic(b, y @ w.T + self.nu * (phi @ projection), w)  # B-step
            projection = ridge(phi, b, self.ridge)  # F-step
        self.projection_ = projection

    def _discrete_cyclic(self, b: np.ndarray, q: np.ndarray, w: np.ndarray) -> np.ndarray:
        """min_B ||Y - BW||² - 2ν tr(Bᵀ F) over B ∈ {±1}: one bit column at a time, in closed form."""
        gram = w @ w.T  # (K, K)
        for _ in range(self.inner_iterations):
            previous = b.copy()
            for k in range(self.bits):
                # Σ_{j≠k} b_j (w_j·w_k), without copying the other columns.
                others = b @ gram[:, k] - b[:, k] * gram[k, k]
                b[:, k] = _sign(q[:, k] - others)
            if np.array_equal(b, previous):
                break
        return b

    def _project(self, centred):
        return (self._rbf(centred) - self.phi_mean_) @ self.projection_


def _label_matrix(labels: np.ndarray | None, n: int) -> np.ndarray:
    """Class ids (N,) or multi-hot (N, C) → (N, C) float64."""
    labels = np.asarray(labels)
    if labels.shape[:1] != (n,) or labels.ndim not in (1, 2):
        raise ValueError(f"labels must be ({n},) class ids or ({n}, C) multi-hot, got shape {labels.shape}")
    if labels.ndim == 2:
        return labels.astype(np.float64)
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError("class-id labels must be non-negative integers")
    return np.eye(int(labels.max()) + 1)[labels]


BASELINES: dict[str, type[HashingBaseline]] = {cls.name: cls for cls in (LSH, PCAH, ITQ, SH, SDH)}


def make_baseline(name: str, bits: int, seed: int = 0, **kwargs) -> HashingBaseline:
    """A baseline by name (lsh, pcah, itq, sh, sdh); kwargs go to its constructor."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name](bits, seed=seed, **kwargs)
