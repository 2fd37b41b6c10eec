"""The operations dashboard: the admin's front page (docs/operations.md "Dashboard")."""
