"""`python -m app.keys`: operators' API keys (docs/operations.md, "Operators").

python -m app.keys create NAME --role operator|integrator   print a new key once, on one line
python -m app.keys list                                       name, role, id, created, last used, revoked
python -m app.keys revoke NAME                                refused by every replica within 5 s

It uses the service's settings (`DATABASE_URL`, and `DB_AUTO_MIGRATE` to create
the tables of a new database first); the logic is in `app.admin.keys`.
"""

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from app.admin.keys import KeyListing, KeyProblem, Role, create_key, list_keys, revoke_key
from app.kit.logs import configure_logging
from app.rates.store import utc_now
from app.settings import Settings, load_settings
from app.storage.engine import create_engine, create_sessionmaker, migrate

T = TypeVar("T")


async def _with_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    database_url = settings.database_url.get_secret_value()
    engine = create_engine(database_url, timeout_s=None if settings.db_auto_migrate else settings.db_timeout_seconds)
    try:
        if settings.db_auto_migrate:
            await migrate(engine)
        async with create_sessionmaker(engine)() as session:
            return await work(session)
    finally:
        await engine.dispose()


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment is not None else "-"


def _table(keys: list[KeyListing]) -> str:
    rows = [("NAME", "ROLE", "ID", "CREATED", "LAST USED", "REVOKED")]
    rows += [
        (k.name, k.role.value, k.key_id, _when(k.created_at), _when(k.last_used_at), _when(k.revoked_at)) for k in keys
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n" for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.keys", description="Create, list and revoke API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="print a new key once; only its hash is stored")
    create.add_argument("name", help="who holds it: 1-64 letters, digits, '.', '_' or '-'")
    create.add_argument("--role", required=True, choices=[role.value for role in Role])
    commands.add_parser("list", help="every key: name, role, id, created, last used, revoked")
    revoke = commands.add_parser("revoke", help="end a key, on every replica within 5 s")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings.log_format)
    try:
        if args.command == "create":
            key = asyncio.run(_with_session(settings, lambda s: create_key(s, args.name, Role(args.role), utc_now())))
            # The key alone on stdout, so `KEY=$(python -m app.keys create …)` captures exactly it.
            sys.stdout.write(key + "\n")
            sys.stderr.write(f"Created {args.role} key {args.name!r}. It is shown this once; only its hash is kept.\n")
        elif args.command == "list":
            sys.stdout.write(_table(asyncio.run(_with_session(settings, list_keys))))
        else:
            asyncio.run(_with_session(settings, lambda s: revoke_key(s, args.name, utc_now())))
            sys.stdout.write(f"Revoked {args.name!r}: every replica refuses it within 5 s.\n")
    except KeyProblem as problem:
        sys.stderr.write(f"fxrates: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
