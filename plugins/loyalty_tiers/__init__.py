"""The "Loyalty tiers" page: a FastAPI app and static assets, registered by ../loyalty_tiers_plugin.py."""

from __future__ import annotations
