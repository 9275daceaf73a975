"""Generate the known-answer vectors in this directory (run once; the outputs are frozen).

    .venv/bin/python tests/secagg/vectors/make_vectors.py

The vectors are computed *independently* of the code under test and only then compared with
it, so a file never merely echoes ``secagg`` back at itself:

* ``prg.json``: the mask PRG is AES-256-CTR with a zero initial counter block. Here the
  keystream is built block by block as AES-256-ECB(key, counter) for counter = 0, 1, 2, ...
  (128-bit big-endian, as in NIST SP 800-38A), then read as little-endian 32- or 64-bit words.
* ``shamir.json``: the share polynomial has the secret as constant term and coefficients drawn
  as 48-byte big-endian integers reduced mod p = 2^256 + 297, in order of increasing degree.
  Here the polynomial is evaluated term by term (no Horner, no numpy).
* ``rfc5869.json`` is copied from RFC 5869, appendix A (test cases 1-3, SHA-256); it is not
  generated.

Rerunning this script must reproduce the files byte for byte; the tests load the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secagg.prg import expand_mask
from secagg.shamir import split_secret

HERE = Path(__file__).parent
PRIME = 2**256 + 297
COEFF_BYTES = 48


def _key(label: str) -> bytes:
    return hashlib.sha256(f"secagg-test-vector/{label}".encode()).digest()


PRG_CASES: list[tuple[str, bytes, int, int]] = [
    ("key-00-1f-32bit-1-block", bytes(range(32)), 32, 4),
    ("key-00-1f-32bit-partial-block", bytes(range(32)), 32, 9),
    ("key-00-1f-64bit-3-blocks", bytes(range(32)), 64, 6),
    ("key-ff-32bit-2-blocks", b"\xff" * 32, 32, 8),
    ("key-ff-64bit-partial-block", b"\xff" * 32, 64, 3),
    ("key-sha-a-32bit-long", _key("a"), 32, 37),
    ("key-sha-b-64bit-long", _key("b"), 64, 19),
]


def ctr_keystream_by_ecb(key: bytes, nbytes: int) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = (nbytes + 15) // 16
    counters = b"".join(i.to_bytes(16, "big") for i in range(blocks))
    return (encryptor.update(counters) + encryptor.finalize())[:nbytes]


def prg_vectors() -> list[dict[str, object]]:
    cases = []
    for name, key, bits, length in PRG_CASES:
        width = bits // 8
        stream = ctr_keystream_by_ecb(key, length * width)
        words = [
            int.from_bytes(stream[i * width : (i + 1) * width], "little") for i in range(length)
        ]
        ours = [int(w) for w in expand_mask(key, length, bits)]
        if ours != words:
            raise SystemExit(f"secagg.prg disagrees with AES-ECB counter blocks in {name}")
        cases.append(
            {
                "name": name,
                "key": key.hex(),
                "bits": bits,
                "length": length,
                "words": [f"{w:0{2 * width}x}" for w in words],
            }
        )
    return cases


class _FixedBytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def token_bytes(self, n: int) -> bytes:
        if n > len(self._data):
            raise AssertionError("split_secret drew more randomness than the vector provides")
        out, self._data = self._data[:n], self._data[n:]
        return out


SHAMIR_CASES: list[tuple[str, bytes, int, list[int]]] = [
    ("t1-n3", _key("s1"), 1, [1, 2, 3]),
    ("t2-n3", _key("s2"), 2, [1, 2, 3]),
    ("t3-n5", _key("s3"), 3, [1, 2, 3, 4, 5]),
    ("t4-n7-sparse-xs", _key("s4"), 4, [2, 3, 5, 8, 13, 21, 34]),
    ("t5-n9-max-secret", b"\xff" * 32, 5, list(range(1, 10))),
    ("t3-n4-zero-secret", bytes(32), 3, [1, 2, 3, 4]),
]


def shamir_vectors() -> list[dict[str, object]]:
    cases = []
    for name, secret, threshold, xs in SHAMIR_CASES:
        randomness = b"".join(
            hashlib.sha512(f"{name}/{i}".encode()).digest()[:COEFF_BYTES]
            for i in range(threshold - 1)
        )
        coefficients = [int.from_bytes(secret, "big")] + [
            int.from_bytes(randomness[i : i + COEFF_BYTES], "big") % PRIME
            for i in range(0, len(randomness), COEFF_BYTES)
        ]
        shares = {
            x: sum(c * pow(x, power, PRIME) for power, c in enumerate(coefficients)) % PRIME
            for x in xs
        }
        ours = split_secret(secret, xs, threshold, _FixedBytes(randomness))
        if ours != shares:
            raise SystemExit(f"secagg.shamir disagrees with term-by-term evaluation in {name}")
        cases.append(
            {
                "name": name,
                "secret": secret.hex(),
                "threshold": threshold,
                "randomness": randomness.hex(),
                "shares": {str(x): f"{y:066x}" for x, y in shares.items()},
            }
        )
    return cases


def write(name: str, cases: list[dict[str, object]]) -> None:
    text = json.dumps({"generator": "make_vectors.py", "cases": cases}, indent=1) + "\n"
    (HERE / name).write_text(text)


if __name__ == "__main__":
    write("prg.json", prg_vectors())
    write("shamir.json", shamir_vectors())
