"""What each `meterproxy` command does (scripts/admin.py reads its options): accounts are
created and listed, tokens minted and checked, the ledger filtered and summed. Secrets are
printed once, at creation, and stored only hashed."""

import os
import sys
from decimal import Decimal
from pathlib import Path

import sqlite_utils

from meterproxy import queries
from meterproxy.errors import GatewayError
from meterproxy.limits import ProductLimits
from meterproxy.queries import LedgerFilter
from meterproxy.store import Store
from meterproxy.token import decode_token, encode_token
from pricing.fees import ProductFees
from scripts.admin_view import as_json, label, table, totals

REPORT_COLUMNS = ("requests", "input_tokens", "output_tokens", "total_cost", "wallet_cost", "merchant_cost")
LEDGER_SUMMARY = (
    "request_id",
    "created_at",
    "status",
    "provider",
    "model",
    "key_mode",
    "input_tokens",
    "output_tokens",
    "total_cost",
    "wallet_cost",
    "error_message",
)
# What `list` shows of each kind of account in a table (--json gives every column).
LISTED = {
    "merchants": ("id", "name", "created_at"),
    "products": (
        "id",
        "name",
        "merchant_id",
        "fixed_fee",
        "markup_percent",
        "input_token_rate",
        "output_token_rate",
        "request_cap",
        "provider_cost_payer",
        "cache_ttl",
    ),
    "wallets": ("id", "name", "balance", "held", "available", "created_at"),
    "connections": ("id", "merchant_id", "wallet_id", "wallet", "revoked_at", "created_at"),
}
# The name shown beside a report's group id: the product's own, the wallet's for a connection.
NAMES = {"product": "name", "connection": "wallet"}


def emit(args, value: dict | list, columns: tuple[str, ...] | None = None) -> None:
    """One thing (a dict) or a list of them, as JSON or as a table."""
    print(as_json(value) if args.json else table(value if isinstance(value, list) else [value], columns))


def public(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "secret_hash"}


def require(store: Store, table: str, row_id: str | None) -> dict | None:
    """The account `row_id` names (None for None); KeyError, said in one line, when none does."""
    if row_id is None:
        return None
    try:
        return store.db[table].get(row_id)
    except sqlite_utils.db.NotFoundError:
        raise KeyError(f"no {table[:-1]} {row_id}") from None


def accounts(store: Store, table: str, merchant_id: str | None = None) -> list[dict]:
    rows = [public(row) for row in store.db[table].rows_where(order_by="created_at, id")]
    return [row for row in rows if merchant_id is None or row.get("merchant_id") == merchant_id]


def merchant_create(store: Store, args) -> None:
    row, secret = store.create_merchant(args.name)
    emit(args, {**public(row), "secret_key": secret})


def product_create(store: Store, args) -> None:
    fees = ProductFees(**{name: getattr(args, name) for name in ProductFees.model_fields})
    limits = ProductLimits(**{name: getattr(args, name) for name in ProductLimits.model_fields})
    row, secret = store.create_product(args.merchant, args.name, fees, limits, args.cache_ttl)
    emit(args, {**public(row), "product_secret": secret})


def wallet_create(store: Store, args) -> None:
    emit(args, store.create_wallet(args.name, args.balance))


def wallet_top_up(store: Store, args) -> None:
    require(store, "wallets", args.wallet)
    store.top_up(args.wallet, args.amount)
    wallet_show(store, args)


def wallet_show(store: Store, args) -> None:
    emit(args, store.wallet(args.wallet))


def connection_create(store: Store, args) -> None:
    row, secret = store.create_connection(args.merchant, args.wallet)
    emit(args, {**public(row), "connection_secret": secret})


def connection_revoke(store: Store, args) -> None:
    store.revoke_connection(args.connection)
    emit(args, public(require(store, "connections", args.connection)))


def list_accounts(store: Store, args) -> None:
    """Merchants, products, wallets (with what they hold) or connections (with their wallet's name)."""
    require(store, "merchants", args.merchant)
    rows = accounts(store, args.kind, args.merchant if args.kind in ("products", "connections") else None)
    if args.kind == "wallets":
        rows = [store.wallet(row["id"]) for row in rows]
    if args.kind == "connections":
        wallets = {wallet["id"]: wallet["name"] for wallet in accounts(store, "wallets")}
        rows = [{**row, "wallet": wallets.get(row["wallet_id"])} for row in rows]
    emit(args, rows, LISTED[args.kind])


def token_mint(store: Store, args) -> None:
    """The token, checked against the database unless --no-check says not to (and then says so)."""
    token = encode_token(
        secret_key=args.secret_key,
        connection_secret=args.connection_secret,
        product_secret=args.product_secret,
        provider_key=args.provider_key,
    )
    decoded = decode_token(token)  # refuse combinations the gateway would refuse
    principal = None if args.no_check else checked(store, decoded)
    if args.no_check:
        print("meterproxy: not checked against the ledger: the gateway checks its secrets on use", file=sys.stderr)
    if not args.json:
        print(token)
        return
    ids = {"merchant_id": None, "connection_id": None, "wallet_id": None, "product_id": None}
    if principal is not None:
        ids = {name: getattr(principal, name) for name in ids}
    emit(args, {"token": token, "key_mode": decoded.key_mode.value, **ids, "checked": principal is not None})


def checked(store: Store, token):
    """The principal the token's secrets name in the database; else a ValueError that says so."""
    try:
        return store.authorize(token)
    except GatewayError as refused:
        refusal = f"{refused} in this ledger: the gateway would refuse this token (--no-check mints it anyway)"
        raise ValueError(refusal) from None


def ledger_filter(store: Store, args) -> LedgerFilter:
    """The rows the options name; each id must name an account."""
    require(store, "merchants", args.merchant)
    require(store, "connections", getattr(args, "connection", None))
    require(store, "products", getattr(args, "product", None))
    return LedgerFilter(
        args.merchant,
        connection_id=getattr(args, "connection", None),
        product_id=getattr(args, "product", None),
        model=getattr(args, "model", None),
        status=getattr(args, "status", None),
        created_after=args.since,
        created_before=args.until,
    )


def report(store: Store, args) -> None:
    """Spend and usage per connection, product, model, metadata key or day (or several of them,
    comma-separated), with a name beside each product's and connection's id and a totals row."""
    groups = queries.rollup(queries.matching(store.db, ledger_filter(store, args)), args.by)
    keys = args.by.split(",")
    names = queries.names(store.db, args.merchant)
    columns = []
    for key in keys:
        columns += [key, NAMES[key]] if key in NAMES else [key]
    groups = [{**group, **{NAMES[key]: names.get(group[key]) for key in keys if key in NAMES}} for group in groups]
    if args.json:
        emit(args, groups)
        return
    shown = [{**group, **{key: label(key, group[key]) for key in keys}} for group in groups]
    emit(args, shown + [totals(groups, keys[0], queries.FIGURES)] if groups else [], (*columns, *REPORT_COLUMNS))


def cache_stats(store: Store, args) -> None:
    """Per product: entries kept, hits, hit ratio (of its completed requests) and money saved."""
    require(store, "merchants", args.merchant)
    emit(args, queries.cache_stats(store.db, args.merchant))


def cache_purge(store: Store, args) -> None:
    require(store, "products", args.product)
    emit(args, {"product_id": args.product, "purged": store.purge_cache(args.product)})


def requests_list(store: Store, args) -> None:
    rows, _ = queries.page(store.db, ledger_filter(store, args), None, args.limit)
    emit(args, rows, LEDGER_SUMMARY)


def own_command() -> str:
    """The admin command as the user can type it again: as the wrappers (scripts/meterproxy,
    scripts/gateway) name it, else as it was called (`.venv/bin/meterproxy`, say)."""
    called = sys.argv[0] if Path(sys.argv[0]).name == "meterproxy" else "meterproxy"
    return os.environ.get("METERPROXY_COMMAND") or called


def development_account(store: Store, gateway: str) -> dict:
    """A merchant, a product without fees, a wallet of $10 and their connection; their ids,
    their secrets (to be shown once), a forward token of them and a curl line that uses it."""
    merchant, secret_key = store.create_merchant("development")
    product, product_secret = store.create_product(merchant["id"], "development", ProductFees())
    wallet = store.create_wallet("development", Decimal("10"))
    connection, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    token = encode_token(secret_key=secret_key, connection_secret=connection_secret, product_secret=product_secret)
    target = "https://api.openai.com/v1/chat/completions"
    curl = (
        f"curl '{gateway}/v1/forward?u={target}' \\\n"
        f"    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n"
        """    -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'"""
    )
    return {
        "merchant_id": merchant["id"],
        "product_id": product["id"],
        "wallet_id": wallet["id"],
        "connection_id": connection["id"],
        "secret_key": secret_key,
        "connection_secret": connection_secret,
        "product_secret": product_secret,
        "token": token,
        "curl": curl,
    }


def quickstart(store: Store, args) -> None:
    """On a fresh database (or with --new): a development account and a token ready to use."""
    command = f"{own_command()} --db {args.db}"
    if store.db["merchants"].count and not args.new:
        if args.json:
            emit(args, {"db": args.db, "gateway": args.gateway, "created": False})
        else:
            print(f"meterproxy: ledger {args.db}, gateway {args.gateway}.")
            print(f"For a new development token: {command} quickstart --new")
        return
    account = development_account(store, args.gateway)
    if args.json:
        emit(args, {"db": args.db, "created": True, **account})
        return
    print(f"""
meterproxy: a development account was created in {args.db}
  merchant {account["merchant_id"]}, product {account["product_id"]} (no fees), wallet {account["wallet_id"]} \
with $10.00, connection {account["connection_id"]}

Secrets (shown once; stored hashed; the merchant's also signs in at {args.gateway}/dashboard):
  merchant secret key  {account["secret_key"]}
  connection secret    {account["connection_secret"]}
  product secret       {account["product_secret"]}

Forward token (these three secrets, encoded; mint others with: {command} token mint --secret-key …):
  {account["token"]}

Try it once the gateway is up:
  {account["curl"]}
Then see its ledger row:  {command} requests
""")
    if not os.environ.get("OPENAI_API_KEY"):
        print(
            "Note: OPENAI_API_KEY is not set, so managed calls get 403. Set it before starting the gateway,\n"
            f"or mint a token that carries your own key: {command} token mint --secret-key … --provider-key sk-…\n"
        )
