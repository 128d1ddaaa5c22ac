"""``mulambda explain NAMESPACE/CLIENT``: why a client gets the executor it gets.

Reads one store snapshot for the registered Client (the same reader the
SDK and the operator use, one round trip, plus HKEYS of the executor
records to name the ones that do not decode) and prints
:func:`mulambda.policy.explain.explain`'s answer: every candidate with its
expected latency in parts, accuracy, utilities and score, every excluded
executor with the criterion that excluded it, and why the winner won.
``--json`` prints the same as the selector's ``GET /v1/explain/NAMESPACE/CLIENT``.
It only reads; the operator's store user (or any user that may read every
key family) is enough.

Exit codes: 0 a winner, 1 no candidate, 2 the client is not registered or
the store cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import sys

from rich import box
from rich.console import Console
from rich.table import Table

from mulambda.policy.explain import Explanation, explain
from mulambda.store.metadata import MetadataStore
from mulambda.store.records import StoreUnavailable

from .storeargs import add_store_options, open_store
from .terminal import printable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("client", metavar="NAMESPACE/CLIENT", help="the Client to explain")
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    add_store_options(parser)


def render(found: Explanation, width: int = 120) -> str:
    """The explanation as terminal text (no colour codes)."""
    out = io.StringIO()
    # Names, reasons and notes come from the store: shown, not read as markup (brackets
    # raised or restyled) nor as control sequences (printable, below).
    console = Console(file=out, width=width, color_system=None, highlight=False, markup=False)
    c, p = found.criteria, found.preferences
    wanted = " ".join(f"{k}={v}" for k, v in (("type", c.type), ("input", c.input),
                                               ("output", c.output)) if v)
    limits = []
    if c.max_latency_ms is not None:
        limits.append(f"max latency {c.max_latency_ms:g} ms")
    if c.min_accuracy is not None:
        limits.append(f"min accuracy {c.min_accuracy:g}")
    console.print(f"client {found.client}: {wanted}; {', '.join([*limits, c.cold_start])}")
    console.print(f"weights: latency {p.latency_weight:g} (utility halves at "
                  f"{p.scale_ms:g} ms, ceiling {p.ceiling_ms:g} ms), accuracy "
                  f"{p.accuracy_weight:g}")
    console.print(f"winner: {found.winner or 'none'}")
    console.print(f"why: {found.why}")
    for line in found.routing:
        console.print(f"routing: {line}")
    if found.candidates:
        table = Table(title="candidates (best first)", title_justify="left",
                      box=box.SIMPLE_HEAD, padding=0, pad_edge=False)
        # "ahead": requests ahead of this one per replica (what the load term charges for)
        for head in ("#", "executor", "score", "state", "latency ms", "net", "service",
                     "load", "cold", "ahead", "accuracy", "u(lat)", "u(acc)"):
            table.add_column(head, justify="left" if head in ("executor", "state") else "right",
                             no_wrap=True)
        for v in found.candidates:
            x = v.candidate
            assert x is not None
            state = ("warm" if x.warm else "cold") + (" >ceiling" if x.over_ceiling else "")
            table.add_row(str(v.position), v.executor, f"{x.score:.3f}", state,
                          f"{x.expected_latency_ms:.1f}", f"{x.network_ms:.1f}",
                          f"{x.service_ms:.1f}", f"{x.load_ms:.1f}", f"{x.cold_start_ms:.0f}",
                          f"{x.inflight:.2f}", f"{x.assumed_accuracy:.3f}",
                          f"{x.latency_utility:.3f}", f"{x.accuracy_utility:.3f}")
        console.print(table)
        notes = [(v.executor, "; ".join(v.candidate.notes)) for v in found.candidates
                 if v.candidate is not None and v.candidate.notes]
        for executor, note in notes:
            console.print(f"  {executor}: {note}")
    if found.excluded:
        table = Table(title="excluded", title_justify="left", box=box.SIMPLE_HEAD)
        for head in ("executor", "criterion", "reason"):
            table.add_column(head)
        for v in found.excluded:
            table.add_row(v.executor, v.criterion or "", v.reason)
        console.print(table)
    return "".join(printable(line.rstrip()) + "\n" for line in out.getvalue().splitlines())


async def explain_client(store: MetadataStore, client: str) -> Explanation | None:
    """The explanation for a registered ``client`` (None when it is not registered)."""
    snap = await store.snapshot(client)
    if snap.client_record is None:
        return None
    unreadable = await store.executor_ids() - set(snap.executors)
    return explain(snap.client_record.criteria, snap, client=client, unreadable=unreadable)


async def _main(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        found = await explain_client(store, args.client)
    except StoreUnavailable as exc:
        print(f"mulambda explain: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()
    if found is None:
        print(f"mulambda explain: client {args.client!r} is not registered in the store "
              "(is the Client applied, and its Registered condition True?)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(found.to_dict(), allow_nan=False, indent=2))
    else:
        print(render(found, width=max(100, shutil.get_terminal_size().columns)), end="")
    return 0 if found.winner else 1


def run(args: argparse.Namespace) -> int:
    if "/" not in args.client:
        print("mulambda explain: give the client as NAMESPACE/NAME", file=sys.stderr)
        return 2
    return asyncio.run(_main(args))
