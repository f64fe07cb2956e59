"""One parser for model source URLs.

A model URL is parsed once into a typed value; every other part of modelship (inspection,
render, the runtime's fetch) works on that value, never on the string.

    s3://bucket/prefix          objects under a prefix, read with the pod's IAM role
    fsx://<pvc>/<path>          a path on an FSx for Lustre PersistentVolumeClaim
    efs://<pvc>/<path>          a path on an EFS PersistentVolumeClaim
    file:///dir                 a local directory (development, tests, the demo)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

# Kubernetes object names (RFC 1123 subdomain) for PVC names.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# S3 bucket naming rules (3-63 chars, lowercase, digits, dots and hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|(fsx|efs)://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?|file:///.*)$"


class SourceError(ValueError):
    """A model URL that cannot be used; the message names the field and the fix.

    `problem` is the message without the field, for callers that name the field themselves."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _name_problem(name: str, what: str, low: int, high: int) -> str | None:
    """What is wrong with a bucket or claim name, in words (None when it is fine)."""
    if not name:
        return f"has no {what}"
    bad = sorted({char for char in name if not (char.islower() or char.isdigit() or char in ".-")})
    if bad:
        return (
            f"{what}s use lowercase letters, digits, dots and hyphens; {name!r} has "
            + ", ".join(repr(char) for char in bad)
        )
    if not (low <= len(name) <= high):
        return f"{what}s are {low} to {high} characters long; {name!r} has {len(name)}"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return f"{what}s start and end with a lowercase letter or digit; {name!r} does not"
    return None


@dataclass(frozen=True)
class S3Source:
    bucket: str
    prefix: str  # "" or ends with "/"
    scheme: Literal["s3"] = "s3"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class VolumeSource:
    """A model on a shared file system, mounted into the pod from a PersistentVolumeClaim."""

    scheme: Literal["fsx", "efs"]
    claim: str
    path: str  # relative path inside the volume, "" for its root

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.claim}/{self.path}"


@dataclass(frozen=True)
class LocalSource:
    path: str  # absolute directory
    scheme: Literal["file"] = "file"

    @property
    def uri(self) -> str:
        return f"file://{self.path}"


ModelSource = S3Source | VolumeSource | LocalSource


def _clean_relative(path: str, field: str, uri: str) -> str:
    parts = [p for p in PurePosixPath("/" + path).parts[1:] if p not in ("", ".")]
    if ".." in parts:
        raise SourceError(field, f"{uri!r} contains '..'; give the model's path without '..'.")
    return "/".join(parts)


def parse_source(uri: str, field: str = "spec.model.uri") -> ModelSource:
    """Parse a model URL into a typed source, or raise SourceError naming `field`."""
    uri = uri.strip()
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise SourceError(
            field,
            f"{uri!r} has no scheme; use s3://bucket/prefix, fsx://<pvc>/<path>, "
            "efs://<pvc>/<path> or file:///dir.",
        )
    scheme = scheme.lower()
    if scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        problem = _name_problem(bucket, "bucket name", 3, 63)
        if problem or not _BUCKET.match(bucket):
            raise SourceError(
                field,
                f"{uri!r}: {problem or 'not an S3 bucket name'}; write s3://<bucket>/<prefix>.",
            )
        prefix = _clean_relative(prefix, field, uri)
        return S3Source(bucket=bucket, prefix=prefix + "/" if prefix else "")
    if scheme in ("fsx", "efs"):
        claim, _, path = rest.partition("/")
        problem = _name_problem(claim, "PersistentVolumeClaim name", 1, 253)
        if problem or not _DNS_SUBDOMAIN.match(claim):
            raise SourceError(
                field,
                f"{uri!r}: {problem or 'not a PersistentVolumeClaim name'}; write "
                f"{scheme}://<pvc-name>/<path inside the volume>.",
            )
        return VolumeSource(scheme=scheme, claim=claim, path=_clean_relative(path, field, uri))  # type: ignore[arg-type]
    if scheme == "file":
        if not rest.startswith("/"):
            raise SourceError(field, f"{uri!r} must be an absolute path: file:///path/to/model.")
        return LocalSource(path="/" + _clean_relative(rest, field, uri))
    raise SourceError(
        field, f"scheme {scheme!r} is not supported; use s3://, fsx://, efs:// or file://."
    )
