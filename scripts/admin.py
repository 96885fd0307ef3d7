"""`meterproxy`: manage merchants, products, wallets and connections, mint forward tokens
and read the ledger. Secrets are printed once, at creation, and stored only hashed."""

import argparse
import json
import os
import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation

from tabulate import tabulate

from meterproxy import queries
from meterproxy.errors import GatewayError
from meterproxy.limits import ProductLimits
from meterproxy.queries import LedgerFilter
from meterproxy.store import Store, iso
from meterproxy.token import decode_token, encode_token
from pricing.fees import DEFAULT_REQUEST_CAP, Payer, ProductFees

DEFAULT_DB = os.environ.get("METERPROXY_DB", "meterproxy.sqlite")
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
    "merchant_cost",
    "usage_source",
)


def amount(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"amount must be a non-negative number: {text!r}")
    return value


def moment(text: str) -> str:
    """An ISO 8601 time as the ledger writes it (UTC, milliseconds), so that it compares right."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return iso(parsed)


def show(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(tabulate(rows, headers="keys", disable_numparse=True) if rows else "(none)")


def public(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "secret_hash"}


def merchant_create(store: Store, args) -> None:
    row, secret = store.create_merchant(args.name)
    show([{**public(row), "secret_key": secret}], args.json)


def product_create(store: Store, args) -> None:
    fees = ProductFees(**{name: getattr(args, name) for name in ProductFees.model_fields})
    limits = ProductLimits(**{name: getattr(args, name) for name in ProductLimits.model_fields})
    row, secret = store.create_product(args.merchant, args.name, fees, limits, args.cache_ttl)
    show([{**public(row), "product_secret": secret}], args.json)


def wallet_create(store: Store, args) -> None:
    show([store.create_wallet(args.name, args.balance)], args.json)


def wallet_top_up(store: Store, args) -> None:
    store.top_up(args.wallet, args.amount)
    wallet_show(store, args)


def wallet_show(store: Store, args) -> None:
    show([store.wallet(args.wallet)], args.json)


def connection_create(store: Store, args) -> None:
    row, secret = store.create_connection(args.merchant, args.wallet)
    show([{**public(row), "connection_secret": secret}], args.json)


def connection_revoke(store: Store, args) -> None:
    store.revoke_connection(args.connection)
    show([public(store.db["connections"].get(args.connection))], args.json)


def token_mint(store: Store, args) -> None:
    token = encode_token(
        secret_key=args.secret_key,
        connection_secret=args.connection_secret,
        product_secret=args.product_secret,
        provider_key=args.provider_key,
    )
    decode_token(token)  # refuse combinations the gateway would refuse
    print(token)


def report(store: Store, args) -> None:
    """Spend and usage per connection, product, model, metadata key or day."""
    where = LedgerFilter(args.merchant, created_after=args.since, created_before=args.until)
    rows = queries.rollup(queries.matching(store.db, where), args.by)
    show(rows if args.json else [{key: row[key] for key in (args.by, *REPORT_COLUMNS)} for row in rows], args.json)


def cache_stats(store: Store, args) -> None:
    """Per product: entries kept, hits, hit ratio (of its completed requests) and money saved."""
    show(queries.cache_stats(store.db, args.merchant), args.json)


def cache_purge(store: Store, args) -> None:
    show([{"product_id": args.product, "purged": store.purge_cache(args.product)}], args.json)


def requests_list(store: Store, args) -> None:
    rows = store.recent_requests(args.limit)
    show(rows if args.json else [{key: row[key] for key in LEDGER_SUMMARY} for row in rows], args.json)


def quickstart(store: Store, args) -> None:
    """On a fresh database (or with --new): a development account and a token ready to use."""
    if store.db["merchants"].count and not args.new:
        print(
            f"meterproxy: ledger {args.db}, gateway {args.gateway}. "
            f"For a new development token: meterproxy --db {args.db} quickstart --new"
        )
        return
    merchant, secret_key = store.create_merchant("development")
    product, product_secret = store.create_product(merchant["id"], "development", ProductFees())
    wallet = store.create_wallet("development", Decimal("10"))
    connection, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    token = encode_token(secret_key=secret_key, connection_secret=connection_secret, product_secret=product_secret)
    target = "https://api.openai.com/v1/chat/completions"
    print(f"""
meterproxy: a development account was created in {args.db}
  merchant {merchant["id"]}, product {product["id"]} (no fees), wallet {wallet["id"]} with $10.00,
  connection {connection["id"]}

Forward token (shown once; secrets are stored hashed):
  {token}
Merchant secret key, to sign in at {args.gateway}/dashboard (shown once):
  {secret_key}

Try it once the gateway is up (it uses the OPENAI_API_KEY of the gateway's environment):
  curl '{args.gateway}/v1/forward?u={target}' \\
    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
Then see its ledger row:  .venv/bin/meterproxy --db {args.db} requests
""")
    if not os.environ.get("OPENAI_API_KEY"):
        print(
            "Note: OPENAI_API_KEY is not set, so managed calls get 403. Set it before starting the gateway,\n"
            "or mint a token that carries your own key: meterproxy token mint --secret-key … --provider-key sk-…\n"
        )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="meterproxy", description=__doc__)
    root.add_argument("--db", default=DEFAULT_DB, help="SQLite database (default: %(default)s, or $METERPROXY_DB)")
    root.add_argument("--json", action="store_true", help="print JSON instead of a table")
    groups = root.add_subparsers(dest="group", required=True)

    def command(group, name, handler, help):
        sub = group.add_parser(name, help=help)
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table")
        sub.set_defaults(handler=handler)
        return sub

    merchant = groups.add_parser("merchant", help="merchants and their secret keys").add_subparsers(required=True)
    command(merchant, "create", merchant_create, "create a merchant; prints its secret key once").add_argument("name")

    product = groups.add_parser("product", help="products and their fees").add_subparsers(required=True)
    sub = command(product, "create", product_create, "create a product; prints its secret once")
    sub.add_argument("name")
    sub.add_argument("--merchant", required=True)
    sub.add_argument("--fixed-fee", type=amount, default=Decimal(0), help="dollars per request")
    sub.add_argument("--markup-percent", type=amount, default=Decimal(0), help="percent of the provider cost")
    sub.add_argument("--input-token-rate", type=amount, default=Decimal(0), help="dollars per million input tokens")
    sub.add_argument("--output-token-rate", type=amount, default=Decimal(0), help="dollars per million output tokens")
    sub.add_argument("--character-rate", type=amount, default=Decimal(0), help="dollars per million characters")
    sub.add_argument("--second-rate", type=amount, default=Decimal(0), help="dollars per second of audio")
    sub.add_argument(
        "--request-cap",
        type=amount,
        default=DEFAULT_REQUEST_CAP,
        help="the most one request may cost, held when it sets no max_tokens (default %(default)s)",
    )
    sub.add_argument(
        "--payer",
        dest="provider_cost_payer",
        type=Payer,
        choices=list(Payer),
        metavar="{wallet,merchant}",
        default=Payer.WALLET,
        help="who pays the provider cost with a managed key",
    )
    sub.add_argument("--rpm", dest="requests_per_minute", type=int, default=0, help="requests a minute per connection")
    sub.add_argument("--tpm", dest="tokens_per_minute", type=int, default=0, help="tokens a minute per connection")
    sub.add_argument(
        "--cache-ttl", type=int, default=0, help="seconds to keep answers for the same question (0: no cache)"
    )

    wallet = groups.add_parser("wallet", help="wallets and balances").add_subparsers(required=True)
    sub = command(wallet, "create", wallet_create, "create a wallet")
    sub.add_argument("name")
    sub.add_argument("--balance", type=amount, default=Decimal(0))
    sub = command(wallet, "top-up", wallet_top_up, "add to a wallet's balance")
    sub.add_argument("wallet")
    sub.add_argument("amount", type=amount)
    command(wallet, "show", wallet_show, "show a wallet").add_argument("wallet")

    connection = groups.add_parser("connection", help="connections of wallets to merchants").add_subparsers(
        required=True
    )
    sub = command(connection, "create", connection_create, "connect a wallet to a merchant; prints its secret once")
    sub.add_argument("--merchant", required=True)
    sub.add_argument("--wallet", required=True)
    command(connection, "revoke", connection_revoke, "revoke a connection (from its next request on)").add_argument(
        "connection"
    )

    token = groups.add_parser("token", help="forward tokens").add_subparsers(required=True)
    sub = command(token, "mint", token_mint, "encode a forward token from secrets")
    sub.add_argument("--secret-key", required=True)
    sub.add_argument("--connection-secret")
    sub.add_argument("--product-secret")
    sub.add_argument("--provider-key", help="the customer's own provider key (BYOK or metering-only)")

    sub = command(groups, "requests", requests_list, "list ledger rows, newest first")
    sub.add_argument("--limit", type=int, default=20)

    sub = command(groups, "report", report, "spend and usage per connection, product, model, metadata key or day")
    sub.add_argument("--by", default="day", help="connection, product, model, day or metadata.<key> (default: day)")
    sub.add_argument("--merchant", help="only this merchant's requests")
    sub.add_argument("--since", type=moment, help="from this ISO 8601 time (inclusive; UTC unless it says)")
    sub.add_argument("--until", type=moment, help="to this ISO 8601 time (exclusive)")

    cache = groups.add_parser("cache", help="the response cache").add_subparsers(required=True)
    command(cache, "stats", cache_stats, "hit ratio and money saved per product").add_argument("--merchant")
    command(cache, "purge", cache_purge, "drop a product's kept answers").add_argument("product")

    sub = command(groups, "quickstart", quickstart, "create a development account on a fresh database")
    sub.add_argument("--gateway", default="http://127.0.0.1:8080")
    sub.add_argument("--new", action="store_true", help="create another development account anyway")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = Store(args.db)
    try:
        args.handler(store, args)
    except KeyError as missing:
        print(f"meterproxy: {missing.args[0]}", file=sys.stderr)
        return 1
    except (ValueError, GatewayError) as invalid:
        print(f"meterproxy: {invalid}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
