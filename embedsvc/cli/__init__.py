"""The one command line: `embedsvc embed | ...`. Each subcommand lives in its own module.

Only the module of the command being run is imported (`embedsvc search --help` never imports torch);
the others appear in the top-level help by their one line below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from embedsvc.errors import EmbedsvcError

# command -> (module under embedsvc.cli, one line for `embedsvc --help`)
COMMANDS = {
    "serve": ("serve", "run the server (gRPC, HTTP/JSON and the search page)"),
    "embed": ("embed", "embed texts and images with a model and poolings, print the vectors"),
    "search": ("remote", "search a collection by text, image, id or vector"),
    "collections": ("remote", "list, create, drop or fit collections"),
    "index": ("index", "bulk-index images into collections (local or through a server)"),
    "compare": ("compare", "compare poolings: recall, speed, memory; table, JSON, plots"),
    "train": ("train", "train an open_clip model on image-caption pairs"),
}
SUBCOMMANDS = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


class _Subcommands:
    """Hands modules the subparsers object, adding each command's help line from COMMANDS."""

    def __init__(self, sub):
        self.sub = sub
        self.added: set[str] = set()

    def add_parser(self, name: str, **kwargs):
        kwargs.setdefault("help", COMMANDS[name][1])
        self.added.add(name)
        return self.sub.add_parser(name, **kwargs)


def _command_in(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser, or (given argv) one where only the command in argv is fully defined."""
    import importlib

    parser = argparse.ArgumentParser(prog="embedsvc", description="CLIP pooled-embedding retrieval service")
    parser.add_argument("--log-level", dest="cli_log_level", default="WARNING", help="logging level (default: WARNING)")
    sub = _Subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    wanted = _command_in(argv) if argv is not None else None
    modules = SUBCOMMANDS if argv is None else ([COMMANDS[wanted][0]] if wanted else [])
    for module in modules:
        importlib.import_module(f"embedsvc.cli.{module}").register(sub)
    for name in COMMANDS:
        if name not in sub.added:  # listed in the help; parsing it would have registered it fully
            sub.add_parser(name)
    return parser


# Commands that serve model forwards, maybe on a shared node: OpenMP must sleep, not spin, when idle.
SHARED_CPU_COMMANDS = ("serve", "index")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in argv if not a.startswith("-")]
    if words and words[0] in SHARED_CPU_COMMANDS:  # before the subcommands import torch and faiss
        from embedsvc.cpu import apply_openmp_defaults

        apply_openmp_defaults()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.cli_log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the server wrote
        print(f"embedsvc {args.command}: error: {message}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    """Our domain errors, and a server's answers (the client is imported only by commands that talk to one)."""
    client_errors = sys.modules.get("embedsvc.client.errors")
    return isinstance(exc, EmbedsvcError) or (
        client_errors is not None and isinstance(exc, client_errors.EmbedsvcClientError)
    )


if __name__ == "__main__":
    sys.exit(main())
