"""The metering API's request and response bodies (SPEC §1.4; fields as Lava's "create request")."""

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from meterproxy.metadata import validate_metadata
from meterproxy.queries import FIGURES
from meterproxy.store import iso
from meterproxy.usage import Usage

Status = Literal["pending", "completed", "error"]


# Far beyond any real request, and within what SQLite integers and exact money can hold.
Count = Annotated[int, Field(ge=0, le=10**12, strict=True)]
Seconds = Annotated[Decimal, Field(ge=0, le=10**9, allow_inf_nan=False)]


class UsageFigures(BaseModel):
    input_tokens: Count = 0
    output_tokens: Count = 0
    input_characters: Count = 0
    output_characters: Count = 0
    input_seconds: Seconds = Decimal(0)
    output_seconds: Seconds = Decimal(0)

    def usage(self) -> Usage:
        return Usage(**self.model_dump(include=set(UsageFigures.model_fields)))


class CreateRequest(UsageFigures):
    """Usage metered outside the gateway, priced and charged like a forwarded request."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$")
    connection_secret: str | None = Field(None, min_length=1, max_length=1024)
    product_secret: str | None = Field(None, min_length=1, max_length=1024)
    metadata: dict[str, str] = {}
    model: str = Field(min_length=1, max_length=255)
    provider: str = Field(min_length=1, max_length=64)

    @field_validator("metadata")
    @classmethod
    def _metadata_rules(cls, metadata: dict[str, str]) -> dict[str, str]:
        return validate_metadata(metadata)


class RequestRecord(UsageFigures):
    request_id: str
    status: Status
    provider: str | None
    endpoint: str | None
    key_mode: str | None
    model: str | None
    provider_response_id: str | None
    connection_id: str | None
    product_id: str | None
    metadata: dict[str, str]
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: str | None
    stream: bool
    cache_hit: bool
    upstream_status: int | None
    error_message: str | None
    total_cost: str | None
    wallet_cost: str | None
    merchant_cost: str | None
    timestamp: str
    completed_at: str | None
    merchant_id: str | None = None
    attempts: int | None = None
    latency_ms: int | None = None
    ttfb_ms: int | None = None

    @classmethod
    def from_row(cls, row: dict) -> "RequestRecord":
        """From a ledger row, or a row as it has just been completed (its metadata a dict)."""
        fields = {name: row.get(name) for name in cls.model_fields if name not in ("metadata", "timestamp")}
        fields.update({name: row.get(name) or 0 for name in (*FIGURES, "input_seconds", "output_seconds")})
        fields.update({flag: bool(row.get(flag)) for flag in ("stream", "cache_hit")})
        metadata = row["metadata"] if isinstance(row["metadata"], dict) else json.loads(row["metadata"] or "{}")
        return cls(**fields, metadata=metadata, timestamp=row["created_at"])


class RequestPage(BaseModel):
    data: list[RequestRecord]
    has_more: bool
    next_cursor: str | None


class ListQuery(BaseModel):
    """`GET /v1/requests` and `GET /v1/usage` query parameters, `metadata.<key>` gathered apart."""

    model_config = ConfigDict(extra="forbid")

    connection_id: str | None = None
    product_id: str | None = None
    model: str | None = None
    status: Status | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    cursor: str | None = None
    limit: int = Field(20, ge=1, le=100)
    group_by: str = "day"  # `GET /v1/usage`: day, model, connection, product, metadata.<key>, or several: day,model
    metadata: dict[str, str] = {}

    @field_validator("metadata")
    @classmethod
    def _metadata_rules(cls, metadata: dict[str, str]) -> dict[str, str]:
        return validate_metadata(metadata)

    def bounds(self) -> tuple[str | None, str | None]:
        return tuple(iso(moment) if moment else None for moment in (self.created_after, self.created_before))


class DailyUsage(BaseModel):
    date: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    input_characters: int
    output_characters: int
    total_cost: str
    wallet_cost: str
    merchant_cost: str


class UsageReport(BaseModel):
    data: list[DailyUsage]
