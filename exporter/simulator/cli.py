"""``applivery-mdm-simulator``: the simulator alone, as an HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from exporter.simulator import dialect
from exporter.simulator.core import Simulator
from exporter.simulator.faults import parse_spec

EXIT_OK, EXIT_FAILURE = 0, 1
DEFAULT_PORT = 10191


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="applivery-mdm-simulator",
        description="A simulated Applivery MDM Windows command API (deterministic per seed).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--token", default="simulator-token")
    parser.add_argument("--organization", default="demo")
    parser.add_argument("--devices", type=_non_negative, default=20, metavar="N")
    parser.add_argument("--batches-per-device", type=_non_negative, default=5, metavar="N",
                        help="history batches per device at start")
    parser.add_argument("--speed", type=_speed, default=1.0, metavar="X",
                        help="simulated seconds per real second (0: time stands still)")
    parser.add_argument("--faults", type=_faults, default="", metavar="SPEC",
                        help="comma-separated kind[=probability][:argument]")
    parser.add_argument("--max-limit", type=_positive, default=100, metavar="N",
                        help="largest page size served")
    parser.add_argument("--control", action="store_true",
                        help="enable the /_simulator/* control endpoint")
    parser.add_argument("--no-events", action="store_true",
                        help="keep no ground-truth event log (large fleets)")
    parser.add_argument("--os-versions", type=_positive, default=None, metavar="N",
                        help="N distinct summary.osVersion values, builds fixed (default: a "
                             "realistic spread of Windows 10 and 11 builds)")
    parser.add_argument("--no-push", action="store_true",
                        help="new batches wait for their device's scheduled session")
    # How undocumented list parameters are read (dialect.py); the defaults are the faithful
    # upstream, the others what a client that relies on them must survive.
    parser.add_argument("--sort-mode", type=sort_mode, default=dialect.HONOUR, metavar="MODE",
                        help="honour, ignore (stored order) or reject (400, code 5000) sort, "
                             "on every list or per list: devices=reject,commands=ignore "
                             "(lists: devices, commands, actions)")
    parser.add_argument("--sort-fields", type=_sort_fields, default=None, metavar="F,F",
                        help="apply --sort-mode only to sorts on these fields")
    parser.add_argument("--tags-format", choices=dialect.TAGS_FORMATS, default=dialect.ANY,
                        help="the device list's tags spelling read: any, repeated (tags=a&tags=b),"
                             " brackets (tags[]=a), comma (tags=a,b), or ignore the filter")
    parser.add_argument("--unknown-filter", choices=dialect.UNKNOWN_FILTERS,
                        default=dialect.IGNORE,
                        help="a tags spelling not read: ignore it (the whole list) or match "
                             "nothing (an empty list)")
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError("must be within 0..65535")
    return value


def _speed(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def sort_mode(text: str) -> str:
    """An argparse type: a sort_mode the simulator accepts."""
    try:
        dialect.Dialect.of(sort_mode=text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _sort_fields(text: str) -> list[str]:
    try:
        dialect.Dialect.of(sort_fields=text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return [field.strip() for field in text.split(",")]


def _faults(text: str) -> str:
    try:
        parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def simulator(args: argparse.Namespace) -> Simulator:
    return Simulator(
        seed=args.seed, devices=args.devices, organization=args.organization, token=args.token,
        speed=args.speed, faults=args.faults, control=args.control, max_limit=args.max_limit,
        batches_per_device=args.batches_per_device, record_events=not args.no_events,
        push=not args.no_push, sort_mode=args.sort_mode, sort_fields=args.sort_fields,
        tags_format=args.tags_format, unknown_filter=args.unknown_filter,
        os_versions=args.os_versions,
    )


async def serve(args: argparse.Namespace) -> int:
    sim = simulator(args)
    runner = web.AppRunner(sim.app(), access_log=None, handle_signals=False)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        await web.TCPSite(runner, args.host, args.port).start()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        host = f"[{args.host}]" if ":" in args.host else args.host
        port = runner.addresses[0][1]
        print(f"Simulated Applivery API at http://{host}:{port}/v1", flush=True)
        print(f"  organization: {args.organization}", flush=True)
        print(f"  token:        {args.token}", flush=True)
        print(f"  devices: {args.devices}, seed: {args.seed}, speed: {args.speed:g}x"
              + (f", faults: {sim.faults.spec}" if sim.faults.spec else "")
              + (f", dialect: {sim.dialect}" if str(sim.dialect) else "")
              + (f", control: http://{host}:{port}/_simulator/" if args.control else ""),
              flush=True)
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
        await runner.cleanup()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:
        print(f"applivery-mdm-simulator: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
