"""`python -m dsjobs.api [flags]`: run the gRPC API server (settings: docs/api.md)."""

from __future__ import annotations

import asyncio
import sys

from dsjobs.api.settings import SettingsError, from_args


def main() -> int:
    from dsjobs.storage import settings_problems

    problems: list[str] = []
    try:
        settings = from_args()
    except (SettingsError, OSError) as exc:
        problems = str(exc).splitlines()
    # A line per wrong setting, the store's with the others: one rollout fixes them all.
    problems += settings_problems()
    if problems:
        for line in problems:
            print(f"dsjobs.api: {line}", file=sys.stderr)
        return 2
    from dsjobs.api.server import serve, setup_logging
    from dsjobs.storage import StorageConfigError

    setup_logging(settings)
    try:
        asyncio.run(serve(settings))
    except StorageConfigError as exc:
        print(f"dsjobs.api: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
