"""`meterproxy`: manage merchants, products, wallets and connections, mint forward tokens
and read the ledger. Secrets are printed once, at creation, and stored only hashed."""

import argparse
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tabulate import tabulate

from meterproxy.store import Store
from meterproxy.token import encode_token
from pricing.fees import Payer, ProductFees

DEFAULT_DB = os.environ.get("METERPROXY_DB", "meterproxy.sqlite")
LEDGER_SUMMARY = ("request_id", "created_at", "status", "provider", "model", "key_mode", "input_tokens",
                  "output_tokens", "total_cost", "wallet_cost", "merchant_cost", "usage_source")


def amount(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"amount must be a non-negative number: {text!r}")
    return value


def show(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(tabulate(rows, headers="keys") if rows else "(none)")


def public(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "secret_hash"}


def merchant_create(store: Store, args) -> None:
    row, secret = store.create_merchant(args.name)
    show([{**public(row), "secret_key": secret}], args.json)


def product_create(store: Store, args) -> None:
    fees = ProductFees(fixed_fee=args.fixed_fee, markup_percent=args.markup_percent, provider_cost_payer=args.payer)
    row, secret = store.create_product(args.merchant, args.name, fees)
    show([{**public(row), "product_secret": secret}], args.json)


def wallet_create(store: Store, args) -> None:
    show([store.create_wallet(args.name, args.balance)], args.json)


def wallet_top_up(store: Store, args) -> None:
    store.top_up(args.wallet, args.amount)
    wallet_show(store, args)


def wallet_show(store: Store, args) -> None:
    show([store.db["wallets"].get(args.wallet)], args.json)


def connection_create(store: Store, args) -> None:
    row, secret = store.create_connection(args.merchant, args.wallet)
    show([{**public(row), "connection_secret": secret}], args.json)


def token_mint(store: Store, args) -> None:
    print(encode_token(
        secret_key=args.secret_key,
        connection_secret=args.connection_secret,
        product_secret=args.product_secret,
        provider_key=args.provider_key,
    ))


def requests_list(store: Store, args) -> None:
    rows = store.recent_requests(args.limit)
    show(rows if args.json else [{key: row[key] for key in LEDGER_SUMMARY} for row in rows], args.json)


def quickstart(store: Store, args) -> None:
    """On a fresh database (or with --new): a development account and a token ready to use."""
    if store.db["merchants"].count and not args.new:
        print(f"meterproxy: ledger {args.db}, gateway {args.gateway}. "
              f"For a new development token: meterproxy --db {args.db} quickstart --new")
        return
    merchant, secret_key = store.create_merchant("development")
    product, product_secret = store.create_product(merchant["id"], "development", ProductFees())
    wallet = store.create_wallet("development", Decimal("10"))
    connection, connection_secret = store.create_connection(merchant["id"], wallet["id"])
    token = encode_token(secret_key=secret_key, connection_secret=connection_secret, product_secret=product_secret)
    target = "https://api.openai.com/v1/chat/completions"
    print(f"""
meterproxy: a development account was created in {args.db}
  merchant {merchant['id']}, product {product['id']} (no fees), wallet {wallet['id']} with $10.00,
  connection {connection['id']}

Forward token (shown once; secrets are stored hashed):
  {token}

Try it once the gateway is up (it uses the OPENAI_API_KEY of the gateway's environment):
  curl '{args.gateway}/v1/forward?u={target}' \\
    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
Then see its ledger row:  .venv/bin/meterproxy --db {args.db} requests
""")
    if not os.environ.get("OPENAI_API_KEY"):
        print("Note: OPENAI_API_KEY is not set, so managed calls get 403. Set it before starting the gateway,\n"
              "or mint a token that carries your own key: meterproxy token mint --secret-key … --provider-key sk-…\n")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="meterproxy", description=__doc__)
    root.add_argument("--db", default=DEFAULT_DB, help="SQLite database (default: %(default)s, or $METERPROXY_DB)")
    root.add_argument("--json", action="store_true", help="print JSON instead of a table")
    groups = root.add_subparsers(dest="group", required=True)

    def command(group, name, handler, help):
        sub = group.add_parser(name, help=help)
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
    sub.add_argument("--payer", type=Payer, choices=list(Payer), default=Payer.WALLET, help="who pays the provider cost")

    wallet = groups.add_parser("wallet", help="wallets and balances").add_subparsers(required=True)
    sub = command(wallet, "create", wallet_create, "create a wallet")
    sub.add_argument("name")
    sub.add_argument("--balance", type=amount, default=Decimal(0))
    sub = command(wallet, "top-up", wallet_top_up, "add to a wallet's balance")
    sub.add_argument("wallet")
    sub.add_argument("amount", type=amount)
    command(wallet, "show", wallet_show, "show a wallet").add_argument("wallet")

    connection = groups.add_parser("connection", help="connections of wallets to merchants").add_subparsers(required=True)
    sub = command(connection, "create", connection_create, "connect a wallet to a merchant; prints its secret once")
    sub.add_argument("--merchant", required=True)
    sub.add_argument("--wallet", required=True)

    token = groups.add_parser("token", help="forward tokens").add_subparsers(required=True)
    sub = command(token, "mint", token_mint, "encode a forward token from secrets")
    sub.add_argument("--secret-key", required=True)
    sub.add_argument("--connection-secret")
    sub.add_argument("--product-secret")
    sub.add_argument("--provider-key", help="the customer's own provider key (BYOK or metering-only)")

    sub = command(groups, "requests", requests_list, "list ledger rows, newest first")
    sub.add_argument("--limit", type=int, default=20)

    sub = command(groups, "quickstart", quickstart, "create a development account on a fresh database")
    sub.add_argument("--gateway", default="http://127.0.0.1:8080")
    sub.add_argument("--new", action="store_true", help="create another development account anyway")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = Store(Path(args.db))
    try:
        args.handler(store, args)
    except KeyError as missing:
        print(f"meterproxy: {missing.args[0]}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
