"""The one JSON serialisation that hashes and digests are computed over.

The audit chain's record hashes, the state store's stored bodies and the digests of the OCI
manifests and configs Portcullis writes all use :func:`canonical_json`, so one document always
has one byte string. Its bytes are fixed: records already in a chain were hashed with them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8 (non-ASCII kept as is), no NaN or infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
