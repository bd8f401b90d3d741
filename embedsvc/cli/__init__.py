"""The one command line: `embedsvc embed | ...`. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from embedsvc.errors import EmbedsvcError

SUBCOMMANDS = ("embed", "serve", "remote", "index", "compare", "train")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="embedsvc", description="CLIP pooled-embedding retrieval service")
    parser.add_argument("--log-level", dest="cli_log_level", default="WARNING", help="logging level (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"embedsvc.cli.{name}").register(sub)
    return parser


# Commands that serve model forwards, maybe on a shared node: OpenMP must sleep, not spin, when idle.
SHARED_CPU_COMMANDS = ("serve", "index")


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    if words and words[0] in SHARED_CPU_COMMANDS:  # before the subcommands import torch and faiss
        from embedsvc.service.cpu import apply_openmp_defaults

        apply_openmp_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.cli_log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except EmbedsvcError as exc:
        print(f"embedsvc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
