"""``iam-pump dead-letters``: list, show, replay and drop dead letters."""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from app.codec import decode_clean_batch
from app.config import Settings
from app.messages import BatchRef, Sender, pump_queue
from app.progress import progress
from app.stores.clients import redis_client
from app.stores.dead_letters import DeadLetter, DeadLetterStore

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_commands(parser: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    """Add the sub-commands of ``dead-letters``."""
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list", parents=[common], help="per pump: entries, records, oldest, first error"
    )
    listing.add_argument("group", nargs="?", help="a pump name (or 'ingest'): list its entries")
    show = actions.add_parser("show", parents=[common], help="one entry with its records")
    show.add_argument("group")
    show.add_argument("entry_id")
    replay = actions.add_parser(
        "replay", parents=[common], help="send entries back to their pump's queue"
    )
    replay.add_argument("group")
    replay.add_argument("entry_ids", nargs="*", help="entries to replay (default: with --all)")
    replay.add_argument("--all", action="store_true", help="replay every entry of the group")
    replay.add_argument(
        "--allow-redacted",
        action="store_true",
        help="also replay entries whose request/policies were redacted or dropped: their "
        "records are written with the placeholder or empty value",
    )
    drop = actions.add_parser("drop", parents=[common], help="delete entries for good")
    drop.add_argument("group")
    drop.add_argument("entry_ids", nargs="*")
    drop.add_argument("--all", action="store_true", help="drop every entry of the group")
    drop.add_argument("--yes", action="store_true", help="confirm: the records are lost")


def _age(entry: DeadLetter) -> str:
    seconds = max(0, int(time.time() - entry.failed_at))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Carry out one ``dead-letters`` action."""
    store = DeadLetterStore(redis_client(settings), settings)
    if args.action == "list":
        return _list(store, args.group)
    if args.action == "show":
        return _show(store, args.group, args.entry_id)
    if args.action == "replay":
        return _replay(store, settings, args)
    return _drop(store, args)


def _list(store: DeadLetterStore, group: str | None) -> int:
    if group is None:
        print(f"{'GROUP':<20} {'ENTRIES':>7} {'RECORDS':>8} {'OLDEST':>7}  FIRST ERROR")
        for name in store.groups():
            entries = store.entries(name)
            if not entries:
                continue
            records = sum(entry.record_count for entry in entries)
            first = entries[0]
            print(f"{name:<20} {len(entries):>7} {records:>8} {_age(first):>7}  {first.error[:80]}")
        return EXIT_OK
    print(f"{'ID':<40} {'STAGE':<8} {'RECORDS':>7} {'AGE':>6}  ERROR")
    for entry in store.entries(group):
        print(
            f"{entry.id:<40} {entry.stage:<8} {entry.record_count:>7} {_age(entry):>6}  "
            f"{entry.error[:80]}"
        )
    return EXIT_OK


def _show(store: DeadLetterStore, group: str, entry_id: str) -> int:
    entry = store.get(group, entry_id)
    if entry is None:
        print(f"no dead letter {entry_id!r} in {group!r}")
        return EXIT_FAILED
    failed_at = datetime.fromtimestamp(entry.failed_at, UTC).isoformat()
    print(f"id:         {entry.id}\ngroup:      {entry.group}\nstage:      {entry.stage}")
    print(f"batch:      {entry.batch_id}\nfailed at:  {failed_at}\nattempts:   {entry.attempts}")
    print(f"records:    {entry.record_count}\nerror:      {entry.error}")
    print(f"replayable: {'yes' if entry.replayable else 'no'}")
    if entry.redacted:
        print(f"redacted:   {_hidden_fields(entry)} (as configured when it was kept)")
    if entry.payload is not None:
        _, records = decode_clean_batch(entry.payload)
        for index, record in enumerate(records):
            reason = f"  <- {entry.reasons[index]}" if index < len(entry.reasons) else ""
            print(
                f"  {record.id} {record.username!r} {record.effect!r} "
                f"{record.request[:60]!r}{reason}"
            )
    for raw, reason in zip(entry.raw, entry.reasons, strict=False):
        if not raw and entry.redacted:
            print(f"  (bytes not kept: their fields could not be found to redact)  <- {reason}")
            continue
        print(f"  {raw[:40].hex()}{'...' if len(raw) > 40 else ''}  <- {reason}")
    return EXIT_OK


def _hidden_fields(entry: DeadLetter) -> str:
    return ", ".join(
        f"{name} {'dropped' if how == 'drop' else 'redacted'}"
        for name, how in sorted(entry.redacted.items())
    )


def _selected(store: DeadLetterStore, args: argparse.Namespace) -> list[DeadLetter] | None:
    if args.all == bool(args.entry_ids):
        print("name entries to act on, or --all (not both)")
        return None
    entries = store.entries(args.group)
    if args.all:
        return entries
    wanted = set(args.entry_ids)
    found = [entry for entry in entries if entry.id in wanted]
    missing = wanted - {entry.id for entry in found}
    for entry_id in sorted(missing):
        print(f"no dead letter {entry_id!r} in {args.group!r}")
    return found


def _replay(store: DeadLetterStore, settings: Settings, args: argparse.Namespace) -> int:
    from app.celery_app import app

    entries = _selected(store, args)
    if entries is None:
        return EXIT_USAGE
    if args.group not in settings.pumps:
        print(f"{args.group!r} is not a configured pump; its entries cannot be replayed")
        return EXIT_FAILED
    sender = Sender(app, pumps=settings.pumps)
    replayed = 0
    with progress(f"replaying {args.group}", len(entries)) as steps:
        for entry in entries:
            steps.advance()
            if not entry.replayable or entry.payload is None:
                steps.say(f"{entry.id}: not replayable (malformed input is kept for inspection)")
                continue
            if entry.redacted and not args.allow_redacted:
                steps.say(
                    f"{entry.id}: {_hidden_fields(entry)}; replaying writes its records without "
                    "them (add --allow-redacted to do so)"
                )
                continue
            sender.send_write(args.group, BatchRef(inline=entry.payload))
            store.delete(args.group, [entry.id])
            replayed += 1
            steps.say(
                f"{entry.id}: {entry.record_count} record(s) sent to {pump_queue(args.group)}"
            )
    print(f"replayed {replayed} entr{'y' if replayed == 1 else 'ies'}")
    return EXIT_OK if replayed == len(entries) else EXIT_FAILED


def _drop(store: DeadLetterStore, args: argparse.Namespace) -> int:
    entries = _selected(store, args)
    if entries is None:
        return EXIT_USAGE
    if not args.yes:
        records = sum(entry.record_count for entry in entries)
        print(
            f"would drop {len(entries)} entries ({records} records) for good; add --yes to confirm"
        )
        return EXIT_USAGE
    dropped = store.delete(args.group, [entry.id for entry in entries])
    print(f"dropped {dropped} entr{'y' if dropped == 1 else 'ies'}")
    return EXIT_OK
