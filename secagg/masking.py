"""Adding masks (participant) and removing them (aggregator and every verifying peer).

    y_u = x_u + PRG(b_u) + sum_{v in M(u)} sign(u, v) * PRG(s_uv)      (mod 2^bits)

with M(u) the neighbours u masked with, sign(u, v) = +1 if u precedes v in the roster and -1
otherwise, and s_uv = HKDF(X25519(s_u, S_v)) bound to session, round and the pair. Summed over
the survivors U3 the pairwise masks between two survivors cancel; what remains is each
survivor's self mask PRG(b_u) and its masks with dropped neighbours, which the unmasking step
recomputes from reconstructed secrets. This module is the one place that does that arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import numpy as np

from .config import RoundConfig
from .crypto import KeyPair, derive_mask_seed, sha256
from .errors import ConfigError, RemoteProtocolError, RoundAborted
from .messages import AdvertiseKeys, UnmaskShares
from .prg import Hasher, MaskExpander
from .ring import WordArray
from .shamir import Reconstructor, ShareError, decode_share

__all__ = [
    "mask_correction",
    "mask_input",
    "reconstruct_secrets",
    "self_mask_commitment",
    "unmask_sum",
]


def self_mask_commitment(seed: bytes) -> bytes:
    """A hiding, binding commitment to a fresh 256-bit self-mask seed."""
    return sha256(b"secagg/self-mask-commitment/v1", seed)


def _pairwise_seed(config: RoundConfig, own: KeyPair, u: str, v: str, v_public: bytes) -> bytes:
    return derive_mask_seed(own.exchange(v_public), config.session_id, config.round, u, v)


def mask_input(
    config: RoundConfig,
    me: str,
    x: WordArray,
    self_seed: bytes,
    mask_keys: KeyPair,
    neighbour_mask_publics: Mapping[str, bytes],
    expander: MaskExpander | None = None,
    hasher: Hasher | None = None,
    out: WordArray | None = None,
) -> WordArray:
    """y_u for ``me``; ``neighbour_mask_publics`` maps each v in M(u) to its mask public key.

    With a ``hasher`` (:func:`secagg.messages.vector_hasher`), y_u's digest comes out of the
    same pass: every mask is added chunk by chunk into y straight from x, so y is written
    once and never read back (:meth:`MaskExpander.combine`). ``out`` is where y is written
    (a fresh array when omitted); it must not be ``x`` nor overlap it, and is returned.
    """
    expander = expander or MaskExpander(config.vector_length, config.bits)
    terms = [(self_seed, 1)] + [
        (_pairwise_seed(config, mask_keys, me, v, public), config.mask_sign(me, v))
        for v, public in neighbour_mask_publics.items()
    ]
    source = np.asarray(x, dtype=expander.dtype)
    if out is None:
        y = np.empty(config.vector_length, dtype=expander.dtype)
    elif np.shares_memory(out, source):
        # y overwriting x would lose the input a retried attempt masks again.
        raise ConfigError("the output buffer for y overlaps the input x")
    else:
        y = out
    expander.combine(y, source, terms, hasher)
    return y


def unmask_sum(
    config: RoundConfig,
    masked: Mapping[str, tuple[tuple[str, ...], WordArray]],
    mask_publics: Mapping[str, bytes],
    self_seeds: Mapping[str, bytes],
    dropped_mask_keys: Mapping[str, KeyPair],
    expander: MaskExpander | None = None,
) -> WordArray:
    """The sum of the survivors' inputs.

    Args:
        masked: for each survivor u in U3, (M(u), y_u).
        mask_publics: advertised mask public keys of every peer in any M(u).
        self_seeds: the reconstructed b_u of every survivor.
        dropped_mask_keys: the reconstructed mask key pair of every peer that is in some
            survivor's M(u) but not a survivor itself.
    """
    total = mask_correction(
        config,
        {u: masked_with for u, (masked_with, _) in masked.items()},
        mask_publics,
        self_seeds,
        dropped_mask_keys,
        expander,
    )
    for _, vector in masked.values():
        np.add(total, vector, out=total)
    return total


def mask_correction(
    config: RoundConfig,
    masked_with: Mapping[str, tuple[str, ...]],
    mask_publics: Mapping[str, bytes],
    self_seeds: Mapping[str, bytes],
    dropped_mask_keys: Mapping[str, KeyPair],
    expander: MaskExpander | None = None,
) -> WordArray:
    """C such that the sum of the survivors' inputs is Σ_u y_u + C (mod 2^bits).

    C = −Σ_u PRG(b_u) − Σ_u Σ_{v ∈ M(u) dropped} sign(u, v)·PRG(s_uv): the masks that do not
    cancel between survivors. It needs only the survivors' mask partners (``masked_with``:
    u in U3 -> M(u)) and the revealed secrets, never a y_u: the aggregator adds it to the sum
    of the vectors it holds, and every verifier uses it in the linear check
    (:mod:`secagg.succinct`) without seeing any y_u.
    """
    expander = expander or MaskExpander(config.vector_length, config.bits)
    total = np.zeros(config.vector_length, dtype=expander.dtype)
    terms = [(self_seeds[u], -1) for u in masked_with]
    for u, partners in masked_with.items():
        for v in partners:
            if v in masked_with:
                continue  # cancels against v's own mask
            seed = _pairwise_seed(config, dropped_mask_keys[v], v, u, mask_publics[u])
            terms.append((seed, -config.mask_sign(u, v)))
    # Every mask in one chunked pass over the sum (MaskExpander.combine).
    expander.combine(total, total, terms)
    return total


def _commits_to(commitment: bytes, seed: bytes) -> bool:
    return self_mask_commitment(seed) == commitment


def _is_private_key_of(public: bytes, private: bytes) -> bool:
    return KeyPair.from_private_bytes(private).public == public


def reconstruct_secrets(
    config: RoundConfig,
    adverts: Mapping[str, AdvertiseKeys],
    survivors: frozenset[str],
    dropped: frozenset[str],
    responses: Mapping[str, UnmaskShares],
    misbehaving: set[str] | None = None,
) -> tuple[dict[str, bytes], dict[str, KeyPair]]:
    """Reconstruct every survivor's self-mask seed and every dropped peer's mask key.

    Each secret is checked against what its owner committed to in its signed advert (the
    self-mask commitment, the mask public key), and with more than t shares every share
    must lie on one polynomial, so a wrong share is detected rather than silently giving a
    wrong sum.

    A single holder whose share of a secret is wrong is found (when more than t shares were
    revealed) and added to ``misbehaving``; the secret is rebuilt without it.

    Raises:
        RoundAborted: fewer than t shares for some secret.
        RemoteProtocolError: shares that do not reconstruct the committed secret even
            without any one holder; the offender is the owner's share holders.
    """
    reconstructor = Reconstructor(config.threshold)
    misbehaving = misbehaving if misbehaving is not None else set()
    self_shares: dict[str, dict[int, int]] = {u: {} for u in survivors}
    key_shares: dict[str, dict[int, int]] = {v: {} for v in dropped}
    for responder, response in responses.items():
        x = config.index(responder)
        for owner, share in response.self_mask_shares:
            if owner in self_shares:
                self_shares[owner][x] = decode_share(share)
        for owner, share in response.mask_key_shares:
            if owner in key_shares:
                key_shares[owner][x] = decode_share(share)

    def rebuild(
        owner: str, shares: dict[int, int], what: str, matches: Callable[[bytes], bool]
    ) -> bytes:
        if len(shares) < config.threshold:
            raise RoundAborted(
                f"only {len(shares)} shares of the {what} of {owner}, {config.threshold} needed"
            )
        holders = ",".join(sorted(config.peers[x - 1] for x in shares))
        secret = _committed(shares, matches)
        if secret is not None:
            return secret
        # A wrong share: with more than t shares, the one holder whose share is off the
        # polynomial is found by leaving each out in turn (checked against the owner's
        # signed commitment), and the round goes on without it.
        for x in sorted(shares):
            rest = {k: v for k, v in shares.items() if k != x}
            if len(rest) < config.threshold:
                break
            secret = _committed(rest, matches)
            if secret is not None:
                misbehaving.add(config.peers[x - 1])
                return secret
        raise RemoteProtocolError(
            holders, f"shares of the {what} of {owner} do not reconstruct its signed advert"
        )

    def _committed(shares: dict[int, int], matches: Callable[[bytes], bool]) -> bytes | None:
        try:
            secret = reconstructor.reconstruct(shares, check=True)
        except ShareError:
            return None
        return secret if matches(secret) else None

    self_seeds = {
        u: rebuild(
            u,
            self_shares[u],
            "self-mask seed",
            partial(_commits_to, adverts[u].self_mask_commitment),
        )
        for u in sorted(survivors)
    }
    dropped_keys = {
        v: KeyPair.from_private_bytes(
            rebuild(
                v,
                key_shares[v],
                "mask key",
                partial(_is_private_key_of, adverts[v].mask_public),
            )
        )
        for v in sorted(dropped)
    }
    return self_seeds, dropped_keys
