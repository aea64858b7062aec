"""Durations ("10s", "1h30m") and memory quantities ("128Mi", "2Gi") of the AgentPool API.

The API keeps them as strings (as Kubernetes users write them); these helpers turn them
into numbers. The patterns are shared with the CRD schema, so anything the API server
accepts parses here.
"""

import math
import re
from datetime import timedelta
from typing import Any, ClassVar

from pydantic import GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema

# Go-style durations without the sign or the micro/nano units nobody writes in a pool spec.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
# The subset of Kubernetes quantities that makes sense for memory: no exponent, no milli.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(QUANTITY_PATTERN)
_QUANTITY_FACTOR = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
MI = 2**20


def parse_duration(text: str) -> timedelta:
    """Parse "1h30m", "120s", "500ms"; raise ValueError on anything else."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"not a duration: {text!r} (expected e.g. 30s, 5m, 1h30m)")
    seconds = sum(float(n) * _DURATION_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    return timedelta(seconds=seconds)


def parse_quantity(text: str) -> int:
    """Parse a memory quantity into bytes, rounding a fractional byte up."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"not a memory quantity: {text!r} (expected e.g. 512Mi, 2Gi)")
    number = text[: len(text) - len(match.group(2) or "")]
    return math.ceil(float(number) * _QUANTITY_FACTOR[match.group(2) or ""])


def ceil_mebibytes(n_bytes: float) -> int:
    """Round up to a whole Mi, so limits read well and do not jitter by a few bytes."""
    # Round away float noise first (400Mi x 1.1 must be 440Mi, not 441Mi).
    return math.ceil(round(n_bytes / MI, 6)) * MI


def format_mebibytes(n_bytes: int) -> str:
    """Render bytes as "<n>Mi" (rounded up), the form the operator writes back."""
    return f"{ceil_mebibytes(n_bytes) // MI}Mi"


class _ParsedText(str):
    """A value as the user wrote it, parsed once when the spec is; a str, so it serializes, hashes
    and prints as written, and the CRD schema is the string pattern the API server checks."""

    PATTERN: ClassVar[str]

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(pattern=cls.PATTERN, max_length=32)
        )


class Duration(_ParsedText):
    """A duration ("1h30m"); `.delta` is its value."""

    PATTERN = DURATION_PATTERN
    delta: timedelta

    def __new__(cls, text: str) -> "Duration":
        value = super().__new__(cls, text)
        value.delta = parse_duration(text)
        return value


class Quantity(_ParsedText):
    """A memory quantity ("512Mi"); `.bytes` is its value."""

    PATTERN = QUANTITY_PATTERN
    bytes: int

    def __new__(cls, text: str) -> "Quantity":
        value = super().__new__(cls, text)
        value.bytes = parse_quantity(text)
        return value
