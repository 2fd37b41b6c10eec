"""The bottom layer: small helpers shared by every app (no models, no app imports; docs/architecture.md)."""
