"""Multi-index hashing (Norouzi, Punjani, Fleet, CVPR 2012) over one packed code matrix.

The code's bits are cut into ``m`` contiguous substrings. If two codes differ in at most ``r`` bits,
some substring differs in at most ``r // m`` of them (pigeonhole), so probing every table with all
keys within ``r // m`` of the query's substring finds every code within ``r`` — plus some that are
farther, which the caller verifies with the full distance.

This module builds the tables; queries probe them in the hashlake_hamming extension (hashlake/native).

Each table is keyed by the first ``key_bits`` bits of its substring (at most ~log2(n), so buckets
hold a few rows and the bucket array stays small); a key's prefix distance is at most the
substring's distance, so the pigeonhole argument still holds. A table is a CSR layout in numpy:
``offsets`` (2**key_bits + 1,) int32 and ``order`` (n,) uint32, the rows sorted by key; the rows of
key v are ``order[offsets[v]:offsets[v + 1]]``. Memory per table: 4·n + 4·2**key_bits bytes.
"""
from __future__ import annotations

import math

import numpy as np

MAX_TABLES = 4  # more tables cut candidates further but each costs 4 bytes per code
MAX_KEY_BITS = 24  # 2**24 int32 offsets = 64 MB per table: the ceiling we accept


def plan(bits: int, n: int) -> tuple[int, int]:
    """(tables, key_bits) for ``n`` codes of ``bits``: substrings of about log2(n) bits (the paper's choice)."""
    log_n = max(8.0, math.log2(max(n, 2)))
    tables = int(min(MAX_TABLES, max(1, round(bits / log_n))))
    key_bits = int(min(bits // tables, MAX_KEY_BITS, math.floor(log_n)))
    return tables, key_bits


def _big_endian_words(codes: np.ndarray) -> np.ndarray:
    """(n, B) uint8 → (n, ceil(B/8)) uint64 where bit 0 of the code is the top bit of word 0."""
    n, nbytes = codes.shape
    if nbytes % 8:
        padded = np.zeros((n, -(-nbytes // 8) * 8), np.uint8)
        padded[:, :nbytes] = codes
        codes = padded
    return codes.view(">u8")


def _field(words: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits [start, start+length) of each code (MSB-first) as int64, the first bit most significant."""
    w, offset = divmod(start, 64)
    if offset + length <= 64:
        return ((words[:, w] >> np.uint64(64 - offset - length)) & np.uint64((1 << length) - 1)).astype(np.int64)
    spill = offset + length - 64  # bits taken from the next word
    high = words[:, w] & np.uint64((1 << (64 - offset)) - 1)
    low = words[:, w + 1] >> np.uint64(64 - spill)
    return ((high << np.uint64(spill)) | low).astype(np.int64)


class MultiIndexHash:
    """The m tables over one code matrix; rows are positions in that matrix."""

    def __init__(self, codes: np.ndarray, tables: int, key_bits: int):
        n, nbytes = codes.shape
        bits = nbytes * 8
        if n >= 2**31:
            raise ValueError(f"{n} codes exceed the int32 offsets of a table; split into segments")
        edges = np.linspace(0, bits, tables + 1).astype(int)
        self.starts = [int(s) for s in edges[:-1]]  # first bit of each substring
        self.key_bits = [min(key_bits, int(e - s)) for s, e in zip(edges[:-1], edges[1:])]
        self.n = n
        self.offsets: list[np.ndarray] = []
        self.order: list[np.ndarray] = []
        words = _big_endian_words(codes)
        for start, kb in zip(self.starts, self.key_bits):
            keys = _field(words, start, kb)
            counts = np.bincount(keys, minlength=1 << kb)
            offsets = np.zeros((1 << kb) + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            self.offsets.append(offsets.astype(np.int32))
            self.order.append(np.argsort(keys, kind="stable").astype(np.uint32))

    @property
    def tables(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.offsets) + sum(o.nbytes for o in self.order)
