"""The dashboard page (filled in by the dashboard issue)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["dashboard"])
