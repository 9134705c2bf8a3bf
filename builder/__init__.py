"""Berth image builder: one module per build stage (see docs/building.md)."""
