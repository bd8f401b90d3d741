"""How every command that talks to a server finds it: --address, default $EMBEDSVC_ADDRESS, and the API token
from $EMBEDSVC_TOKEN.

The token is read from the environment only, never from a flag: a command line is visible to every user of
the machine (ps, /proc). A server without auth ignores a token; one with auth refuses calls without it.
"""

from __future__ import annotations

import argparse
import os

ADDRESS_ENV = "EMBEDSVC_ADDRESS"
TOKEN_ENV = "EMBEDSVC_TOKEN"
DEFAULT_ADDRESS = "127.0.0.1:50051"


def default_address() -> str:
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def address_help(what: str = "server address") -> str:
    return f"{what} (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS}); the API token comes from ${TOKEN_ENV}"


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    """--address and --timeout of the commands that always talk to a server."""
    parser.add_argument("--address", default=default_address(), help=address_help())
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds")


def client(address: str, timeout: float | None = 60.0):
    from embedsvc.client import Client

    return Client(address, timeout=timeout, token=token())
