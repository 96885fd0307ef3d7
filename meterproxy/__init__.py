"""meterproxy's functional core: plain functions and data over bytes and dicts.

The mitmproxy addons in `addons/` adapt proxy hooks to this package; nothing here imports
mitmproxy, so every piece is unit-tested without a running proxy.
"""
