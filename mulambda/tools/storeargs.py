"""The store a read-only tool (``mulambda explain``, ``mulambda top``) opens: URL and prefix
from the command line or the ``MULAMBDA_*`` settings, the user and password from
``MULAMBDA_REDIS_USERNAME``/``MULAMBDA_REDIS_PASSWORD`` (never a command-line argument: it
would show in ``ps`` and shell history)."""

from __future__ import annotations

import argparse

from mulambda.settings import Settings
from mulambda.store.metadata import MetadataStore


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
    return MetadataStore.from_url(args.redis_url or settings.redis_url,
                                  prefix=args.key_prefix or settings.key_prefix, pool_size=8)
