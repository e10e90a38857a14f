"""API keys and what each may use: the `--api-keys FILE` table and the per-request principal.

The file is JSON::

    {"keys": {
        "sk-tenant-a": {"adapters": ["support", "legal"]},
        "sk-tenant-b": {"adapters": ["*"], "base": false},
        "sk-ops":      {"admin": true},
        "sk-prometheus": {"metrics": true, "base": false}
    }}

`adapters` lists the adapter names the key may use (`"*"` = every adapter); `base` (default
true) whether it may use the base model; `admin` (default false) allows every model, the
`/v1/adapters` admin routes and `/metrics`; `metrics` (default false) allows `/metrics` only
(a scrape key: the page names tenants' adapters). Clients send `Authorization: Bearer <key>`.
Keys are held only as SHA-256 digests; an error in the file names the file and the entry's
position, never a key. Knows nothing about the engine or HTTP routing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ALL = "*"


class KeyFileError(ValueError):
    """The api-keys file cannot be used; one line naming the problem."""


class KeyPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    adapters: tuple[str, ...] = ()
    base: bool = True
    admin: bool = False
    metrics: bool = False


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: dict[str, KeyPolicy] = Field(min_length=1)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who sent a request: `policy` None means the server is open (no key table)."""

    label: str
    policy: KeyPolicy | None

    @property
    def admin(self) -> bool:
        return self.policy is None or self.policy.admin

    @property
    def reads_metrics(self) -> bool:
        return self.admin or self.policy.metrics

    def may_use(self, adapter: str | None) -> bool:
        """`adapter` None = the base model."""
        p = self.policy
        if p is None or p.admin:
            return True
        if adapter is None:
            return p.base
        return ALL in p.adapters or adapter in p.adapters


OPEN = Principal("open", None)


class KeyTable:
    """Digest -> policy; `lookup` returns the principal of a key or None."""

    def __init__(self, keys: dict[str, KeyPolicy]):
        self._by_digest = {_digest(k): (f"key-{i}", p) for i, (k, p) in enumerate(keys.items())}

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, key: str) -> Principal | None:
        found = self._by_digest.get(_digest(key))
        return Principal(*found) if found else None

    @classmethod
    def from_file(cls, path: str | Path) -> KeyTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise KeyFileError(f"api-keys file {path} cannot be read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise KeyFileError(f"api-keys file {path} is not valid JSON: {e}") from None
        try:
            table = KeyFile.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = _where(first["loc"], data)
            raise KeyFileError(f"api-keys file {path}: {where}: {first['msg']}") from None
        return cls(table.keys)


def _where(loc: tuple, data) -> str:
    """A validation error's place, a key's own text replaced by its entry's position."""
    if len(loc) < 2 or loc[0] != "keys" or not isinstance(data, dict):
        return ".".join(str(x) for x in loc) or "top level"
    keys = list(data["keys"])
    entry = keys.index(loc[1]) + 1 if loc[1] in keys else "?"
    rest = "".join(f".{x}" for x in loc[2:])
    return f"keys entry {entry} of {len(keys)}{rest}"


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
