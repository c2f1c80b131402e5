"""Fixed-point encoding and pairwise additive masks: the arithmetic of secure aggregation.

A site's contribution (its weights times its sample count, so that the sum over sites divided by
the summed counts is FedAvg's mean) is encoded as integers modulo 2^64 (`SCALE` = 2^24 steps per
unit, two's complement for negatives), and every pair of sites (i, j) adds the same mask with
opposite signs: i < j adds +m_ij, j adds -m_ij. Summed over the sites of a session the masks cancel
exactly (integer arithmetic, no rounding), and what is left decodes to the sum of the
contributions to within 2^-24 per site. One site's masked array alone is uniform over the integers:
it carries nothing of its contribution. Masks are a ChaCha20 keystream keyed by the pair's shared
secret, one stream per array name, so no two arrays or sessions share a mask.
"""

from __future__ import annotations

import hashlib

import numpy as np

SCALE = float(2**24)
MAX_MAGNITUDE = 2.0**38  # |value| * SCALE stays below 2^62: sums over many sites cannot wrap


class EncodingRange(ValueError):
    """A value too large to encode without wrapping (the message names the array, not the value)."""


def encode(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each array as uint64 fixed point (value * SCALE, rounded, two's complement)."""
    out = {}
    for name, value in values.items():
        array = np.asarray(value, np.float64)
        if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) >= MAX_MAGNITUDE:
            raise EncodingRange(f"'{name}' holds a value outside the encodable range (finite, |x| < 2^38)")
        out[name] = np.rint(array * SCALE).astype(np.int64).view(np.uint64)
    return out


def decode(summed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Summed uint64 fixed point back to float64."""
    return {name: np.asarray(value, np.uint64).view(np.int64).astype(np.float64) / SCALE for name, value in summed.items()}


def add(total: dict[str, np.ndarray] | None, masked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`total + masked` modulo 2^64, array by array (a new dict)."""
    if total is None:
        return {name: np.array(value, np.uint64) for name, value in masked.items()}
    return {name: total[name] + np.asarray(masked[name], np.uint64) for name in total}


def pair_mask(shared: bytes, session: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The mask of one array for one pair in one session: ChaCha20 keystream as uint64."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    key = hashlib.sha256(b"medfed-secagg-mask|" + shared + b"|" + session.encode() + b"|" + name.encode()).digest()
    size = int(np.prod(shape, dtype=np.int64))
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * (8 * size))
    return np.frombuffer(stream, dtype=np.uint64).reshape(shape).copy()


def masked(encoded: dict[str, np.ndarray], session: str, own: str, shared: dict[str, bytes]) -> dict[str, np.ndarray]:
    """`encoded` plus this site's pairwise masks: +m for each peer whose name sorts after `own`,
    -m for each before (`shared`: peer name -> the pair's shared secret)."""
    out = {name: np.array(value, np.uint64) for name, value in encoded.items()}
    for peer, secret in shared.items():
        for name, value in out.items():
            mask = pair_mask(secret, session, name, value.shape)
            out[name] = value + mask if own < peer else value - mask
    return out
