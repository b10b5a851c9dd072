"""Hadamard matrices (±1, mutually orthogonal rows) of the orders hash centres need: 2^k, 48, and other Paley orders."""
from __future__ import annotations

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4)."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if x in residues else -1 for x in range(1, q)])  # quadratic character
    jacobsthal = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Q[i, j] = χ(j − i)
    skew = torch.zeros(q + 1, q + 1, dtype=torch.long)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return skew + torch.eye(q + 1, dtype=torch.long)  # S + I, with S skew-symmetric and S Sᵀ = qI


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix H (n, n) of ±1 with H Hᵀ = n I, as float32.

    Orders: powers of two (Sylvester), q + 1 for a prime q ≡ 3 mod 4 (Paley I, e.g. 12, 24, 48),
    and twice any order constructible so. Raises for other n.
    """
    matrix = _build(n)
    if matrix is None:
        raise ValueError(
            f"no Hadamard construction here for order {n} (need 2^k, q+1 with prime q≡3 mod 4, or twice such)"
        )
    return matrix.float()


def _build(n: int) -> torch.Tensor | None:
    if n == 1:
        return torch.ones(1, 1, dtype=torch.long)
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley(n - 1)
    half = _build(n // 2) if n % 2 == 0 else None
    if half is None:
        return None
    return torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0)  # Sylvester doubling
