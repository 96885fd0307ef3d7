"""`meterproxy`: manage merchants, products, wallets and connections, mint forward tokens
and read the ledger. Secrets are printed once, at creation, and stored only hashed."""

import argparse
import os
import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation

from meterproxy.errors import GatewayError
from meterproxy.store import Store, iso
from pricing.fees import DEFAULT_REQUEST_CAP, Payer
from scripts.admin_commands import (
    LISTED,
    cache_purge,
    cache_stats,
    connection_create,
    connection_revoke,
    list_accounts,
    merchant_create,
    product_create,
    quickstart,
    report,
    requests_list,
    token_mint,
    wallet_create,
    wallet_show,
    wallet_top_up,
)

DEFAULT_DB = os.environ.get("METERPROXY_DB", "meterproxy.sqlite")
JSON_HELP = "print JSON (an object for one thing, an array for a list; money as exact decimal strings)"


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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="meterproxy", description=__doc__)
    root.add_argument(
        "--db",
        default=DEFAULT_DB,
        help="the ledger: a SQLite file or a postgresql:// URL (default: %(default)s, or $METERPROXY_DB)",
    )
    root.add_argument("--json", action="store_true", help=JSON_HELP)
    groups = root.add_subparsers(dest="group", required=True, metavar="command")

    def command(group, name, handler, help):
        sub = group.add_parser(name, help=help, description=help)
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
        sub.set_defaults(handler=handler)
        return sub

    def subcommands(name, help):
        return groups.add_parser(name, help=help, description=help).add_subparsers(required=True, metavar="action")

    def window(sub, what: str) -> None:
        sub.add_argument("--merchant", metavar="MERCHANT_ID", help=f"only this merchant's {what}")
        sub.add_argument("--since", type=moment, help="from this ISO 8601 time (inclusive; UTC unless it says)")
        sub.add_argument("--until", type=moment, help="to this ISO 8601 time (exclusive)")

    merchant = subcommands("merchant", "merchants and their secret keys")
    sub = command(merchant, "create", merchant_create, "create a merchant; prints its secret key once")
    sub.add_argument("name", help="the merchant's name, for people")

    product = subcommands("product", "products and their fees")
    sub = command(product, "create", product_create, "create a product; prints its secret once")
    sub.add_argument("name", help="the product's name, for people")
    sub.add_argument("--merchant", required=True, metavar="MERCHANT_ID", help="the merchant that sells it")
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
        help="who pays the provider cost with a managed key (default: wallet)",
    )
    sub.add_argument("--rpm", dest="requests_per_minute", type=int, default=0, help="requests a minute per connection")
    sub.add_argument("--tpm", dest="tokens_per_minute", type=int, default=0, help="tokens a minute per connection")
    sub.add_argument(
        "--cache-ttl", type=int, default=0, help="seconds to keep answers for the same question (0: no cache)"
    )

    wallet = subcommands("wallet", "wallets and balances")
    sub = command(wallet, "create", wallet_create, "create a wallet")
    sub.add_argument("name", help="the wallet's name, for people (a customer, say)")
    sub.add_argument("--balance", type=amount, default=Decimal(0), help="dollars to start with (default 0)")
    sub = command(wallet, "top-up", wallet_top_up, "add to a wallet's balance")
    sub.add_argument("wallet", metavar="WALLET_ID", help="the wallet to top up")
    sub.add_argument("amount", type=amount, help="dollars to add")
    command(wallet, "show", wallet_show, "show a wallet: balance, held for calls in flight, available").add_argument(
        "wallet", metavar="WALLET_ID", help="the wallet to show"
    )

    connection = subcommands("connection", "connections of wallets to merchants")
    sub = command(connection, "create", connection_create, "connect a wallet to a merchant; prints its secret once")
    sub.add_argument("--merchant", required=True, metavar="MERCHANT_ID", help="the merchant the wallet pays")
    sub.add_argument("--wallet", required=True, metavar="WALLET_ID", help="the wallet that pays")
    command(connection, "revoke", connection_revoke, "revoke a connection (from its next request on)").add_argument(
        "connection", metavar="CONNECTION_ID", help="the connection to revoke"
    )

    sub = command(groups, "list", list_accounts, "list merchants, products, wallets or connections")
    sub.add_argument("kind", choices=list(LISTED), help="what to list")
    sub.add_argument("--merchant", metavar="MERCHANT_ID", help="only this merchant's products or connections")

    token = subcommands("token", "forward tokens")
    sub = command(token, "mint", token_mint, "encode a forward token from secrets, checked against the database")
    sub.add_argument("--secret-key", required=True, metavar="MSK", help="the merchant's secret key (msk_…)")
    sub.add_argument("--connection-secret", metavar="CSK", help="the connection's secret (csk_…): who pays")
    sub.add_argument("--product-secret", metavar="PSK", help="the product's secret (psk_…): which fees")
    sub.add_argument("--provider-key", metavar="KEY", help="the customer's own provider key (BYOK or metering-only)")
    sub.add_argument(
        "--no-check", action="store_true", help="do not check the secrets against the database (the gateway will)"
    )

    sub = command(groups, "requests", requests_list, "list ledger rows, newest first, with their error messages")
    sub.add_argument("--limit", type=int, default=20, help="how many rows at most (default %(default)s)")
    sub.add_argument("--status", choices=["pending", "completed", "error"], help="only rows with this status")
    sub.add_argument("--model", help="only rows of this model")
    sub.add_argument("--connection", metavar="CONNECTION_ID", help="only this connection's rows")
    sub.add_argument("--product", metavar="PRODUCT_ID", help="only this product's rows")
    window(sub, "rows")

    sub = command(groups, "report", report, "spend and usage per connection, product, model, metadata key or day")
    sub.add_argument(
        "--by",
        default="day",
        help="connection, product, model, day or metadata.<key>, or several comma-separated (default: day)",
    )
    window(sub, "requests")

    cache = subcommands("cache", "the response cache")
    command(cache, "stats", cache_stats, "hit ratio and money saved per product").add_argument(
        "--merchant", metavar="MERCHANT_ID", help="only this merchant's products"
    )
    command(cache, "purge", cache_purge, "drop a product's kept answers").add_argument(
        "product", metavar="PRODUCT_ID", help="the product whose answers to drop"
    )

    sub = command(groups, "quickstart", quickstart, "create a development account on a fresh database")
    sub.add_argument("--gateway", default="http://127.0.0.1:8080", help="the gateway's URL, for the curl line")
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
