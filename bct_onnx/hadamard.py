"""Hadamard matrices for rotations: Sylvester doubling and Paley's construction, Kronecker products.

A Hadamard matrix H of order n has entries +-1 and H H^T = n I. ``randomized_hadamard`` returns
``diag(signs) H / sqrt(n)``: orthogonal, with every entry +-1/sqrt(n), so a rotation applied at run
time as a MatMul by this constant is stored exactly by a 4-bit symmetric block (all magnitudes equal).
"""

from __future__ import annotations

import functools

import numpy as np

# Paley I gives order q + 1 for a prime q = 3 (mod 4). These orders (times powers of two and of each
# other) cover the hidden sizes of common transformers (576 = 12 * 12 * 4, 768 = 12 * 64, 960 = 60 * 16).
_PALEY_PRIMES = (3, 7, 11, 19, 23, 31, 43, 47, 59, 67, 71, 79, 83, 103, 107, 127)


def _paley(q: int) -> np.ndarray:
    """Hadamard matrix of order q + 1 (Paley I), q prime and q = 3 mod 4."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=np.int64)
    jacobsthal = np.array([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=np.int64)
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jacobsthal
    return s + np.eye(n, dtype=np.int64)


@functools.lru_cache(maxsize=32)
def hadamard(n: int) -> np.ndarray | None:
    """A Hadamard matrix of order n (int64 +-1), or None when none of these constructions reaches n."""
    if n < 1:
        return None
    if n == 1:
        return np.ones((1, 1), dtype=np.int64)
    if n % 2 == 0:
        half = hadamard(n // 2)
        if half is not None:
            return np.block([[half, half], [half, -half]])
    for q in _PALEY_PRIMES:
        m = q + 1
        if n % m == 0:
            rest = hadamard(n // m)
            if rest is not None:
                return np.kron(_paley(q), rest)
    return None


def randomized_hadamard(n: int, seed: int = 0) -> np.ndarray | None:
    """``diag(signs) H / sqrt(n)`` in float64 (orthogonal), random signs from seed; None if no H of order n."""
    h = hadamard(n)
    if h is None:
        return None
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return signs[:, None] * h.astype(np.float64) / np.sqrt(n)
