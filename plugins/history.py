"""History: /history, /show, /export of one's own generations; private generations."""

from __future__ import annotations
