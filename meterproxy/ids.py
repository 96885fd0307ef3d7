"""Prefixed ULIDs (`req_01K7…`), sortable by creation time like Lava's identifiers.

A ULID is 48 bits of Unix time in milliseconds and 80 random bits, written as 26 characters of
Crockford's base 32. Made here with the standard library's base 32 (the same 5-bit groups, another
alphabet): every call has one, and the `ulid` package's object takes several times as long.
"""

import base64
import os
import time

_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def new_ulid() -> str:
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10))
    # 160 bits are 32 characters; the first 6 are the 30 zero bits above the ULID's 130.
    return base64.b32encode(value.to_bytes(20)).translate(_CROCKFORD)[6:].decode()


def new_id(prefix: str) -> str:
    return f"{prefix}_{new_ulid()}"
