"""Binary codes: signs to packed bits (MSB-first, as numpy.packbits) and the reference Hamming distance.

This is the one place that packs and unpacks codes; every other module calls it.
Contract: a code has K bits, K a multiple of 8; bit i is ``h[i] > 0``; bit 0 is the most
significant bit of byte 0.
"""
from __future__ import annotations

import numpy as np

# Code lengths the system supports end to end (shards, SQL, search kernels).
SUPPORTED_BITS = (16, 32, 48, 64, 128, 256)


class CodeLengthError(ValueError):
    """A code's length does not match what the caller expects."""


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported code length, else raise naming the allowed ones."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported code length {bits} bits; supported: {SUPPORTED_BITS}")
    return bits


def pack_signs(h) -> np.ndarray:
    """Continuous outputs (N, K) → packed codes (N, K/8) uint8; bit i = h[:, i] > 0.

    Accepts a numpy array or a torch tensor (moved to CPU). Zero maps to bit 0.
    """
    if hasattr(h, "detach"):  # torch.Tensor, without importing torch here
        h = h.detach().to("cpu").numpy()
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[1] % 8:
        raise CodeLengthError(f"expected outputs of shape (N, K) with K a multiple of 8, got {h.shape}")
    return np.packbits(h > 0, axis=1)


def pack_bits(bits01: np.ndarray) -> np.ndarray:
    """Bits (N, K) of 0/1 → packed codes (N, K/8) uint8."""
    bits01 = np.asarray(bits01)
    if bits01.ndim != 2 or bits01.shape[1] % 8:
        raise CodeLengthError(f"expected bits of shape (N, K) with K a multiple of 8, got {bits01.shape}")
    return np.packbits(bits01.astype(bool), axis=1)


def unpack(codes: np.ndarray) -> np.ndarray:
    """Packed codes (N, K/8) uint8 → bits (N, K) uint8 of 0/1."""
    return np.unpackbits(as_code_matrix(codes), axis=1)


def to_signs(codes: np.ndarray) -> np.ndarray:
    """Packed codes (N, K/8) → ±1 float32 (N, K), the form the mAP literature computes with."""
    return unpack(codes).astype(np.float32) * 2.0 - 1.0


def as_code_matrix(codes, nbytes: int | None = None) -> np.ndarray:
    """Coerce to a C-contiguous (N, B) uint8 matrix; check B == nbytes when given."""
    arr = np.ascontiguousarray(codes, dtype=np.uint8)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise CodeLengthError(f"expected packed codes of shape (N, bytes), got {arr.shape}")
    if nbytes is not None and arr.shape[1] != nbytes:
        raise CodeLengthError(
            f"code has {arr.shape[1] * 8} bits ({arr.shape[1]} bytes) but {nbytes * 8} bits were expected"
        )
    return arr


def code_from_hex(text: str, bits: int | None = None) -> bytes:
    """Parse a hex code (optionally ``0x``-prefixed, spaces ignored); check its length when ``bits`` given."""
    cleaned = text.strip().lower().removeprefix("0x").replace(" ", "")
    try:
        raw = bytes.fromhex(cleaned)
    except ValueError as exc:
        raise ValueError(f"not a hex code: {text!r} ({exc})") from None
    if bits is not None and len(raw) * 8 != bits:
        raise CodeLengthError(f"code has {len(raw) * 8} bits but {bits} bits were expected")
    return raw


def code_to_hex(code: bytes | np.ndarray) -> str:
    return bytes(np.asarray(code, dtype=np.uint8).tobytes()).hex()


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Brute-force Hamming distances between packed codes a (Na, B) and b (Nb, B) → (Na, Nb) int32.

    The reference that every faster kernel is tested against; O(Na·Nb·B) memory in blocks.
    """
    a = as_code_matrix(a)
    b = as_code_matrix(b, a.shape[1])
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    block = max(1, (1 << 24) // max(1, b.size))  # keep the (block, Nb, B) temporary near 16 MB
    for start in range(0, a.shape[0], block):
        x = a[start : start + block, None, :] ^ b[None, :, :]
        out[start : start + block] = _POPCOUNT8[x].sum(axis=2, dtype=np.int32)
    return out
