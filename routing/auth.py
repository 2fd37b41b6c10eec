"""Authentication of API clients: defined in governance.auth (routing sits above governance), re-exported here."""

from __future__ import annotations

from governance.auth import MASTER, MasterKeyAuthentication, Principal, bearer_token, master_key_matches

__all__ = ["MASTER", "MasterKeyAuthentication", "Principal", "bearer_token", "master_key_matches"]
