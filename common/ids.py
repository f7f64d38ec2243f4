"""Identifier types and their generators.

The gateway is the only creator of request ids; workers choose their own worker ids and boot ids.
"""

from __future__ import annotations

import uuid
from typing import NewType

RequestId = NewType("RequestId", str)
WorkerId = NewType("WorkerId", str)
MigrationId = NewType("MigrationId", str)
BootId = NewType("BootId", str)


def new_request_id(prefix: str = "cmpl") -> RequestId:
    """A fresh request id such as `chatcmpl-1f0c...`; it is also the OpenAI response `id`."""
    return RequestId(f"{prefix}-{uuid.uuid4().hex}")


def new_migration_id() -> MigrationId:
    return MigrationId(f"mig-{uuid.uuid4().hex[:16]}")


def new_boot_id() -> BootId:
    return BootId(uuid.uuid4().hex)
