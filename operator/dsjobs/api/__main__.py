"""`python -m dsjobs.api [flags]`: run the gRPC API server (settings: docs/api.md)."""

from __future__ import annotations

import asyncio
import sys

from dsjobs.api.settings import SettingsError, from_args


def main() -> int:
    try:
        settings = from_args()
    except (SettingsError, OSError) as exc:
        for line in str(exc).splitlines():  # a line per wrong setting
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
