"""Cryptographic primitives of SecAgg+ (Bonawitz et al. CCS'17; Bell et al. CCS'20), pure, no I/O.

Construction, everything from ``cryptography``:

- Key agreement: X25519. Each site holds two key pairs per round (one for the share
  encryption channel, one for the pairwise masks). The raw 32-byte X25519 output is never
  used directly: ``agree`` feeds it to HKDF-SHA256 (length 32, no salt) with an ``info``
  string naming the purpose, so that the same Diffie-Hellman output gives independent keys
  for independent purposes (e.g. ``b"fedcore/secagg/v1/share-encryption"`` versus
  ``b"fedcore/secagg/v1/pairwise-mask"``). Low-order peer keys (an all-zero shared secret)
  and keys of the wrong length are rejected with ``SecurityError``.
- Authenticated encryption of Shamir shares routed through the server: AES-256-GCM with a
  fresh random 96-bit nonce from the OS per message; wire format ``nonce || ciphertext || tag``.
  The associated data binds a ciphertext to its context (round, sender, recipient), so the
  server cannot replay or redirect it. Any failure to decrypt is a ``SecurityError``.
- Mask expansion: the keystream of AES-256-CTR keyed by the full 256-bit seed (an agreed
  pairwise secret or a site's self-mask seed), zero initial counter block, read as
  little-endian unsigned integers of 32 or 64 bits. Because 2**bits divides 2**128, each
  integer is exactly uniform modulo 2**bits given a uniform keystream. Key material is
  never folded into a small seed nor fed to a non-cryptographic generator.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, overload

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.errors import SecurityError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_BYTES",
    "TAG_BYTES",
    "KeyPair",
    "add_mask",
    "add_masks",
    "agree",
    "decrypt",
    "encrypt",
    "expand_mask",
    "generate_keypair",
    "valid_public",
]

PUBLIC_KEY_BYTES: Final = 32
KEY_BYTES: Final = 32
"""Length of agreed keys, AES-256 keys and mask seeds."""
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
_UDType = np.dtype[np.unsignedinteger[Any]]
_MASK_DTYPES: Final[dict[int, _UDType]] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_NATIVE_DTYPES: Final[dict[int, _UDType]] = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}
_CTR_BLOCK_BYTES: Final = 16


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte encodings: ``public`` travels on the wire; ``private``
    stays with its owner (bytes, so a site's protocol state can be kept between rounds)."""

    private: bytes = field(repr=False)
    public: bytes

    @staticmethod
    def from_private(private: bytes) -> KeyPair:
        key = X25519PrivateKey.from_private_bytes(private)
        public = key.public_key().public_bytes(
            encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
        )
        return KeyPair(private=private, public=public)

    def key(self) -> X25519PrivateKey:
        """The private key loaded, for several `agree` calls in a row (loading costs as much
        as the exchange)."""
        return X25519PrivateKey.from_private_bytes(self.private)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the OS's secure random source."""
    return KeyPair.from_private(os.urandom(KEY_BYTES))


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, *, info: bytes) -> bytes:
    """The 32-byte key shared with the owner of ``peer_public`` for the purpose named by ``info``.

    X25519, then HKDF-SHA256 (salt None, length 32, the given ``info``). Symmetric:
    ``agree(a, B, info=i) == agree(b, A, info=i)``. Raises ``SecurityError`` when the peer key
    is malformed: not 32 bytes, or a low-order point (all-zero shared secret).
    """
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise SecurityError(
            f"malformed X25519 public key: {len(peer_public)} bytes, expected {PUBLIC_KEY_BYTES}"
        )
    try:
        key = (
            private if isinstance(private, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(private)
        )
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # cryptography rejects an all-zero shared secret (low-order point)
        raise SecurityError(f"rejected X25519 public key: {exc}") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


_FIELD: Final = 2**255 - 19
# Any fixed scalar finds a low-order point: X25519 clamps scalars to multiples of 8 below
# 2**255, so the product is zero exactly for the points of order dividing 8 (or 4 on the
# twist). Not a secret: it probes keys, it agrees on nothing.
_PROBE: Final = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def valid_public(public: bytes) -> bool:
    """Whether ``public`` is an X25519 public key worth agreeing with: 32 bytes, canonical
    (u < 2**255 - 19: X25519 ignores the top bit and reduces u, so a non-canonical copy of
    another site's key would pass a byte-wise comparison) and not of low order (every
    agreement with it is all zero: a "secret" everyone knows)."""
    if len(public) != PUBLIC_KEY_BYTES or int.from_bytes(public, "little") >= _FIELD:
        return False
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # cryptography refuses an all-zero shared secret
        return False
    return True


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256 key must be {KEY_BYTES} bytes, got {len(key)}")


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12 bytes, fresh from the OS) || ciphertext || tag (16 bytes)``.

    ``associated`` is authenticated, not encrypted, and must be given again to ``decrypt``.
    Raises ``ValueError`` for a key that is not 32 bytes (a programming error, not an attack).
    """
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    """Inverse of ``encrypt``; ``SecurityError`` on any failure to authenticate.

    Wrong key, wrong associated data, any modified byte, or a message too short to hold a
    nonce and a tag all raise ``SecurityError``. A key that is not 32 bytes raises ``ValueError``.
    """
    _check_key(key)
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise SecurityError(
            f"ciphertext too short: {len(ciphertext)} bytes, at least {NONCE_BYTES + TAG_BYTES} expected"
        )
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, associated)
    except InvalidTag as exc:
        raise SecurityError("decryption failed: wrong key, wrong associated data or tampered") from exc


@overload
def expand_mask(seed: bytes, count: int, *, bits: Literal[32] = ...) -> npt.NDArray[np.uint32]: ...
@overload
def expand_mask(seed: bytes, count: int, *, bits: Literal[64]) -> npt.NDArray[np.uint64]: ...
@overload
def expand_mask(seed: bytes, count: int, *, bits: int) -> npt.NDArray[np.unsignedinteger[Any]]: ...
def expand_mask(seed: bytes, count: int, *, bits: int = 32) -> npt.NDArray[np.unsignedinteger[Any]]:
    """``count`` integers uniform modulo ``2**bits`` from the AES-256-CTR keystream of ``seed``.

    ``bits`` 32 gives ``uint32``, 64 gives ``uint64``; the keystream is read little-endian.
    Deterministic: the same seed always gives the same mask, which is how a mask is removed
    (or recovered from Shamir shares for a dropped site). The array is freshly allocated and
    writable.
    """
    if len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes, got {len(seed)}")
    if bits not in _MASK_DTYPES:
        raise ValueError(f"bits must be 32 or 64, got {bits}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    nbytes = count * (bits // 8)
    # An all-zero initial counter block is safe: every seed keys exactly one mask (a pairwise
    # secret or a self-mask seed is fresh per round and per purpose), so no (key, counter)
    # pair ever encrypts twice; the 128-bit counter cannot wrap for any realistic count.
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(_CTR_BLOCK_BYTES))).encryptor()
    # One call of the cipher over a zero buffer: the output is the raw keystream.
    out = bytearray(nbytes + _CTR_BLOCK_BYTES - 1)
    written = encryptor.update_into(bytes(nbytes), out)
    encryptor.finalize()
    if written != nbytes:  # pragma: no cover - CTR is a stream mode
        raise RuntimeError(f"AES-CTR wrote {written} bytes, expected {nbytes}")
    little = np.frombuffer(out, dtype=_MASK_DTYPES[bits], count=count)
    # A no-op view on little-endian hosts; a byte swap on big-endian ones.
    return little.astype(_NATIVE_DTYPES[bits], copy=False)


_CHUNK_BYTES: Final = 1 << 18  # keystream made and added in L2-sized pieces: 1.6x faster than whole


class _Buffers(threading.local):
    """Per-thread keystream buffer, reused: fresh multi-megabyte buffers per mask cost more
    (page faults) than the AES, and a small one stays in cache between AES and the add.
    Set in __init__, which threading.local runs once in every thread (a class attribute
    would be one buffer shared by all threads)."""

    def __init__(self) -> None:
        self.out = bytearray(_CHUNK_BYTES + _CTR_BLOCK_BYTES - 1)


_buffers = _Buffers()
_ZEROS: Final = bytes(_CHUNK_BYTES)  # the CTR plaintext: the output is the keystream itself


def add_mask(into: npt.NDArray[np.unsignedinteger[Any]], seed: bytes, *, subtract: bool = False) -> None:
    """``into += mask`` (or ``-=``) modulo 2**bits, in place, where mask is what
    ``expand_mask(seed, into.size, bits=...)`` returns for ``into``'s dtype (uint32 or uint64)."""
    add_masks(into, [(seed, subtract)])


def add_masks(into: npt.NDArray[np.unsignedinteger[Any]], masks: Sequence[tuple[bytes, bool]]) -> None:
    """``add_mask(into, seed, subtract=subtract)`` for every (seed, subtract) of `masks`, in
    one pass over `into`: each piece of it stays in cache while every mask's keystream for
    that piece is added, instead of `into` crossing memory once per mask."""
    bits = {np.dtype(np.uint32): 32, np.dtype(np.uint64): 64}.get(into.dtype)
    if bits is None or into.ndim != 1:
        raise ValueError(f"masks apply to 1-d uint32/uint64 vectors, got {into.dtype} {into.shape}")
    for seed, _ in masks:
        if len(seed) != KEY_BYTES:
            raise ValueError(f"mask seed must be {KEY_BYTES} bytes, got {len(seed)}")
    streams = [
        (
            Cipher(algorithms.AES(seed), modes.CTR(bytes(_CTR_BLOCK_BYTES))).encryptor(),
            np.subtract if subtract else np.add,
        )
        for seed, subtract in masks
    ]
    per_chunk = _CHUNK_BYTES // into.itemsize
    keystream = np.frombuffer(_buffers.out, dtype=_MASK_DTYPES[bits], count=per_chunk)
    zeros = memoryview(_ZEROS)
    for start in range(0, into.size, per_chunk):
        part = into[start : start + per_chunk]
        for encryptor, combine in streams:
            written = encryptor.update_into(zeros[: part.nbytes], _buffers.out)
            if written != part.nbytes:  # pragma: no cover - CTR is a stream mode
                raise RuntimeError(f"AES-CTR wrote {written} bytes, expected {part.nbytes}")
            combine(part, keystream[: part.size], out=part)  # little-endian view: the cast is exact
    for encryptor, _ in streams:
        encryptor.finalize()
