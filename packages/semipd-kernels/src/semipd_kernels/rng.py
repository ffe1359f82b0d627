"""Counter-based random numbers for sampling: u = f(seed, step, vocab index), no state, no host sync.

A 32-bit integer hash (a lowbias32-style xor-shift-multiply mixer) done in int64 with masking: every product
is a value < 2^32 times a constant < 2^31, so nothing overflows int64 and torch, the Triton interpreter and
compiled Triton all compute the same bits. The Triton twin lives in `semipd_kernels.triton.sampling` and uses
these constants.
"""

from __future__ import annotations

from torch import Tensor

MASK32 = 0xFFFFFFFF
MUL_A = 0x21F0AAAD  # both < 2^31 so (x < 2^32) * MUL stays below 2^63
MUL_B = 0x735A2D97
KEY_SALT = 0x1B873593  # separates the seed/step key from the per-index stream
# u = ((h >> 8) + 0.5) / 2^24: 24 random bits, exactly representable in float32, strictly inside (0, 1)
UNIFORM_SCALE = 1.0 / (1 << 24)


def hash32(x: Tensor) -> Tensor:
    """x: int64 tensor of values in [0, 2^32) -> int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK32
    return x ^ (x >> 15)


def row_key(seeds: Tensor, steps: Tensor) -> Tensor:
    """Fold (seed, step), any int64 values, into one 32-bit key per row."""
    h = hash32(seeds & MASK32)
    h = hash32(h ^ ((seeds >> 32) & MASK32))
    h = hash32(h ^ (steps & MASK32))
    return hash32(h ^ ((steps >> 32) & MASK32))


def uniform_from_hash(seeds: Tensor, steps: Tensor, index: Tensor) -> Tensor:
    """float32 uniforms in (0, 1), broadcasting seeds/steps (int64) against index (int64 vocab positions)."""
    key = row_key(seeds, steps)
    h = hash32((index + key) & MASK32)
    h = hash32(h ^ (key ^ KEY_SALT))
    return ((h >> 8).float() + 0.5) * UNIFORM_SCALE
