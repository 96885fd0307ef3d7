"""Prefixed ULIDs (`req_01K7…`), sortable by creation time like Lava's identifiers."""

from ulid import ULID


def new_id(prefix: str) -> str:
    return f"{prefix}_{ULID()}"
