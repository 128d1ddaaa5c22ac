"""The store a read-only tool (``mulambda explain``, ``mulambda top``) opens: URL and prefix
from the command line or the ``MULAMBDA_*`` settings, the user and password from
``MULAMBDA_REDIS_USERNAME``/``MULAMBDA_REDIS_PASSWORD`` (never a command-line argument: it
would show in ``ps`` and shell history)."""

from __future__ import annotations

import argparse

from mulambda.settings import Settings, SettingsError
from mulambda.store.metadata import MetadataStore

_SCHEMES = ("redis://", "rediss://", "unix://")


def add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=None,
                        help="store URL (default MULAMBDA_REDIS_URL); log in with "
                             "MULAMBDA_REDIS_USERNAME/MULAMBDA_REDIS_PASSWORD, e.g. the "
                             "operator's read permissions")
    parser.add_argument("--key-prefix", default=None,
                        help="key prefix (default MULAMBDA_KEY_PREFIX)")


def open_store(args: argparse.Namespace) -> MetadataStore:
    """A store for ``args`` (does not connect until the first command)."""
    settings = Settings.from_env()
    url = args.redis_url or settings.redis_url
    if not url.startswith(_SCHEMES):
        # redis-py's ValueError was a traceback; the URL is not echoed (it may hold a user).
        raise SettingsError(f"the store URL must start with {', '.join(_SCHEMES)} "
                            "(e.g. redis://localhost:6379/0)")
    return MetadataStore.from_url(url, prefix=args.key_prefix or settings.key_prefix,
                                  pool_size=8)
