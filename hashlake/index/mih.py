"""Multi-index hashing (Norouzi, Punjani, Fleet, CVPR 2012) over one packed code matrix.

The code's bits are cut into ``m`` contiguous substrings. If two codes differ in at most ``r`` bits,
some substring differs in at most ``r // m`` of them (pigeonhole), so probing every table with all
keys within ``r // m`` of the query's substring finds every code within ``r`` — plus some that are
farther, which the caller verifies with the full distance.

Each table is keyed by the first ``key_bits`` bits of its substring (at most ~log2(n), so buckets
hold a few rows and the bucket array stays small); a key's prefix distance is at most the
substring's distance, so the pigeonhole argument still holds. A table is a CSR layout in numpy:
``offsets`` (2**key_bits + 1,) int32 and ``order`` (n,) uint32, the rows sorted by key; the rows of
key v are ``order[offsets[v]:offsets[v + 1]]``. Memory per table: 4·n + 4·2**key_bits bytes.
"""
from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations

import numpy as np

MAX_TABLES = 4  # more tables cut candidates further but each costs 4 bytes per code
MAX_KEY_BITS = 24  # 2**24 int32 offsets = 64 MB per table: the ceiling we accept


def plan(bits: int, n: int) -> tuple[int, int]:
    """(tables, key_bits) for ``n`` codes of ``bits``: substrings of about log2(n) bits (the paper's choice)."""
    log_n = max(8.0, math.log2(max(n, 2)))
    tables = int(min(MAX_TABLES, max(1, round(bits / log_n))))
    key_bits = int(min(bits // tables, MAX_KEY_BITS, math.floor(log_n)))
    return tables, key_bits


@lru_cache(maxsize=256)
def flip_masks(key_bits: int, shell: int) -> np.ndarray:
    """All ``key_bits``-bit masks with exactly ``shell`` bits set, (C(key_bits, shell),) int64."""
    if shell > key_bits:
        return np.zeros(0, np.int64)
    masks = [sum(1 << b for b in combo) for combo in combinations(range(key_bits), shell)]
    return np.asarray(masks, dtype=np.int64)


def shell_size(key_bits: int, shell: int) -> int:
    return math.comb(key_bits, shell) if shell <= key_bits else 0


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
        if n >= 2**32:
            raise ValueError(f"{n} codes exceed the uint32 row numbers of a table; split into segments")
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
            self.offsets.append(offsets.astype(np.int32) if n < 2**31 else offsets)
            self.order.append(np.argsort(keys, kind="stable").astype(np.uint32))

    @property
    def tables(self) -> int:
        return len(self.starts)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.offsets) + sum(o.nbytes for o in self.order)

    def query_keys(self, query: np.ndarray) -> list[int]:
        """The table keys of one query code (B,) uint8."""
        words = _big_endian_words(query.reshape(1, -1))
        return [int(_field(words, s, kb)[0]) for s, kb in zip(self.starts, self.key_bits)]

    def probe(self, table: int, query_key: int, shell: int) -> np.ndarray:
        """Rows whose key in ``table`` differs from ``query_key`` in exactly ``shell`` bits, (c,) int64."""
        keys = flip_masks(self.key_bits[table], shell) ^ query_key
        if keys.size == 0:
            return np.zeros(0, np.int64)
        offsets = self.offsets[table]
        starts = offsets[keys].astype(np.int64)
        lens = offsets[keys + 1] - starts
        total = int(lens.sum())
        if total == 0:
            return np.zeros(0, np.int64)
        # positions starts[i] .. starts[i] + lens[i] - 1 for every probe i, in one vectorized pass
        first = np.cumsum(lens) - lens
        positions = np.arange(total, dtype=np.int64) + np.repeat(starts - first, lens)
        return self.order[table][positions].astype(np.int64)
