"""Prices and fees: provider cost from genai-prices (with local overrides), product fees,
and how a request's cost splits between wallet and merchant (SPEC §5)."""
