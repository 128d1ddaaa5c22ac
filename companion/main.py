"""``mulambda companion``: the sidecar beside TF Serving that loads the model and reports on it.

The command reads its settings (:class:`mulambda.settings.CompanionSettings`)
and runs :mod:`.lifecycle` until SIGTERM. Exit codes: 0 after a graceful
stop, 1 if one of the companion's loops crashed, 2 for a missing or
malformed ``MULAMBDA_*`` variable (the log line names it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading

from mulambda.settings import CompanionSettings, SettingsError

from .logs import configure_logging

log = logging.getLogger("mulambda.companion")


def configure(parser: argparse.ArgumentParser) -> None:
    """All configuration comes from MULAMBDA_* variables (see mulambda.settings)."""
    parser.epilog = (
        "Configured through MULAMBDA_* environment variables; see mulambda.settings."
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``mulambda companion``."""
    # Imported here: `mulambda companion --help` needs none of the clients.
    from .lifecycle import S3ModelSource, serve

    try:
        config = CompanionSettings.from_env()
    except SettingsError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    configure_logging(config.shared.log_level)
    try:
        source = S3ModelSource.from_config(config)
    except ValueError as exc:  # S3 endpoint or credentials missing: a configuration problem
        log.error("invalid configuration: %s", exc)
        return 2
    code = asyncio.run(serve(config, source=source))
    busy = [t for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if busy:
        # The loader's thread pool would be joined at interpreter exit, i.e. the
        # download would run to completion first (see the lifecycle module's docstring).
        log.warning("exiting during a download threads=%d; it resumes on the next start",
                    len(busy))
        logging.shutdown()
        os._exit(code)
    return code
