"""Checksums for the fetch: which one the store keeps, and how to compute it from parts.

S3 keeps a checksum per object in one of these forms, best first for a parallel download:

    crc64nvme / crc32c / crc32      a full-object CRC (FULL_OBJECT, or a single-part object):
                                    each downloaded part is CRC'd in its own worker while it is
                                    still in its buffer, and the parts' CRCs are combined
                                    (crc(A || B) from crc(A), crc(B), len(B)): no ordered pass
                                    over the file and no re-read. CRC32C runs at tens of GB/s.
    *-composite                     a CRC or SHA-256 of the upload parts' checksums ("...-N"):
                                    one checksum per upload part, then one over their bytes.
    md5 / md5-multipart / sha256    an MD5 ETag (whole object, or AWS's MD5 of the parts' MD5s)
                                    or a whole-object SHA-256: hashed in order, ~0.3-0.6 GB/s per
                                    core for MD5; used only when the store keeps nothing cheaper.
    size                            nothing to check but the length (e.g. SSE-KMS without checksums).

Every part also gets a CRC (the store's algorithm when it keeps a CRC, else CRC32C) that the
resume journal records, so a resumed part is checked against what was written before it is
trusted again.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from awscrt import checksums as crt

CrcAlgorithm = Literal["crc32", "crc32c", "crc64nvme"]
VerifyMethod = Literal[
    "crc64nvme",
    "crc32c",
    "crc32",
    "crc64nvme-composite",
    "crc32c-composite",
    "crc32-composite",
    "md5",
    "md5-multipart",
    "sha256",
    "sha256-composite",
    "size",
]
SIZE_ONLY: VerifyMethod = "size"
JOURNAL_CRC: CrcAlgorithm = "crc32c"

_CRC_BYTES: dict[CrcAlgorithm, int] = {"crc32": 4, "crc32c": 4, "crc64nvme": 8}
# zlib's CRC32 is ~4x faster than awscrt's here; both compute the same (IEEE) CRC32.
_CRC_UPDATE: dict[CrcAlgorithm, Callable[[Any, int], int]] = {
    "crc32": lambda data, previous: zlib.crc32(data, previous),
    "crc32c": lambda data, previous: crt.crc32c(data, previous),
    "crc64nvme": lambda data, previous: crt.crc64nvme(data, previous),
}
_CRC_COMBINE: dict[CrcAlgorithm, Callable[[int, int, int], int]] = {
    "crc32": crt.combine_crc32,
    "crc32c": crt.combine_crc32c,
    "crc64nvme": crt.combine_crc64nvme,
}
# The response field of each checksum, in the order a fetch prefers them.
CRC_FIELDS: tuple[tuple[str, CrcAlgorithm], ...] = (
    ("ChecksumCRC64NVME", "crc64nvme"),
    ("ChecksumCRC32C", "crc32c"),
    ("ChecksumCRC32", "crc32"),
)


def crc(algorithm: CrcAlgorithm, data: Any, previous: int = 0) -> int:
    """The CRC of `data` (any buffer), continuing from `previous`."""
    return _CRC_UPDATE[algorithm](data, previous)


def crc_combine(algorithm: CrcAlgorithm, first: int, second: int, second_length: int) -> int:
    """crc(A || B) from crc(A), crc(B) and len(B), without reading either again."""
    if second_length == 0:
        return first
    return _CRC_COMBINE[algorithm](first, second, second_length)


def crc_combine_all(algorithm: CrcAlgorithm, pieces: list[tuple[int, int]]) -> int:
    """The CRC of consecutive pieces given as (crc, length) pairs, in order."""
    total = 0
    for value, length in pieces:
        total = crc_combine(algorithm, total, value, length)
    return total


def crc_text(algorithm: CrcAlgorithm, value: int) -> str:
    """The CRC as S3 writes it: base64 of its big-endian bytes."""
    return base64.b64encode(value.to_bytes(_CRC_BYTES[algorithm], "big")).decode()


@dataclass(frozen=True)
class Checksum:
    """How a completed file is verified: `segment_bytes` is the store's upload part size for
    composite checksums and multipart ETags (one digest per part), else the whole size."""

    method: VerifyMethod
    expected: str
    segment_bytes: int

    @property
    def crc_algorithm(self) -> CrcAlgorithm | None:
        """The CRC the store keeps (full or composite), or None for MD5, SHA-256 and size."""
        name = self.method.removesuffix("-composite")
        return name if name in _CRC_BYTES else None

    @property
    def part_crc(self) -> CrcAlgorithm:
        """The CRC computed for every part (the journal's, and the store's when it is a CRC)."""
        return self.crc_algorithm or JOURNAL_CRC

    @property
    def hashed_in_order(self) -> bool:
        """MD5 and SHA-256 cannot be combined from parts: they need an ordered pass."""
        return self.method.startswith(("md5", "sha256"))

    def new_hasher(self) -> Any:
        """A fresh hasher for one segment of an in-order checksum."""
        return hashlib.sha256() if self.method.startswith("sha256") else hashlib.md5()

    def combine_digests(self, digests: list[bytes]) -> str:
        """The checksum text of an in-order method from its segments' digests."""
        if self.method == "md5":
            return digests[0].hex()
        if self.method == "sha256":
            return base64.b64encode(digests[0]).decode()
        if self.method == "md5-multipart":
            return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"
        if self.method == "sha256-composite":
            combined = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
            return f"{combined}-{len(digests)}"
        raise ValueError(f"{self.method} is not an in-order checksum")

    def combine_crcs(self, segments: list[int]) -> str:
        """The checksum text of a CRC method from its segments' CRCs (one for a full-object CRC)."""
        algorithm = self.crc_algorithm
        if algorithm is None:
            raise ValueError(f"{self.method} is not a CRC checksum")
        if not self.method.endswith("-composite"):
            return crc_text(algorithm, segments[0])
        width = _CRC_BYTES[algorithm]
        joined = b"".join(value.to_bytes(width, "big") for value in segments)
        return f"{crc_text(algorithm, crc(algorithm, joined))}-{len(segments)}"


def is_md5_hex(text: str) -> bool:
    """Whether an ETag is a plain MD5 (32 hex digits)."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text.lower())
