"""mitmproxy addons: thin adapters from proxy hooks to the functional core in `meterproxy`.
`gateway.py` composes them; each other module is one concern."""
