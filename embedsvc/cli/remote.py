"""`embedsvc search` and `embedsvc collections ...`: talk to a running server through the client."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _client(args):
    from embedsvc.client import Client

    return Client(args.address, timeout=args.timeout)


def _common(p) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="server address (default: 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds")


def register(sub) -> None:
    s = sub.add_parser("search")
    s.add_argument("collection")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image", help="image file")
    q.add_argument("--id", help="id of a stored item (more like this)")
    s.add_argument("-k", "--top-k", type=int, default=10)
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata filter, repeatable; KEY=a|b matches any of the values")
    s.add_argument("--json", action="store_true")
    _common(s)
    s.set_defaults(run=run_search)

    c = sub.add_parser("collections")
    actions = c.add_subparsers(dest="action", required=True)
    ls = actions.add_parser("list")
    _common(ls)
    create = actions.add_parser("create")
    create.add_argument("name")
    create.add_argument("--model", default="", help="model name (default: the server's default)")
    create.add_argument("--pooling", default="cls", help="pooling spec, e.g. gem:p=3 (default: cls)")
    create.add_argument("--index", default="flat", help="flat, ivf, hnsw, ivfpq or a FAISS factory string")
    create.add_argument("--metric", default="cosine", choices=["cosine", "inner_product"])
    create.add_argument("--dim", type=int, default=0, help="vector-only collection of this dimension (no model)")
    _common(create)
    drop = actions.add_parser("drop")
    drop.add_argument("name")
    _common(drop)
    c.set_defaults(run=run_collections)


def _client_errors(fn):
    def wrapper(args):
        from embedsvc.client import EmbedsvcClientError

        try:
            return fn(args)
        except EmbedsvcClientError as exc:
            print(f"embedsvc {args.command}: {exc}", file=sys.stderr)
            return 2

    return wrapper


def _parse_filter(expressions: list[str]) -> dict:
    out = {}
    for expression in expressions:
        key, eq, raw = expression.partition("=")
        if not eq:
            raise SystemExit(f"embedsvc search: --filter {expression!r} must be KEY=VALUE")
        values = [_scalar(v) for v in raw.split("|")]
        out[key] = values if len(values) > 1 else values[0]
    return out


def _scalar(raw: str):
    if raw in ("true", "false"):
        return raw == "true"
    try:
        return float(raw)
    except ValueError:
        return raw


@_client_errors
def run_search(args) -> int:
    query = {"text": args.text} if args.text is not None else {"id": args.id} if args.id else None
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            print(f"embedsvc search: image file {path} does not exist", file=sys.stderr)
            return 2
        query = {"image": path}
    with _client(args) as client:
        hits = client.search(args.collection, top_k=args.top_k, filter=_parse_filter(args.filter), **query)
    if args.json:
        json.dump([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits], sys.stdout)
        print()
        return 0
    for rank, hit in enumerate(hits, 1):
        label = hit.metadata.get("caption") or json.dumps(hit.metadata)
        print(f"{rank:>3}  {hit.score:.4f}  {hit.id}  {label}")
    return 0


@_client_errors
def run_collections(args) -> int:
    with _client(args) as client:
        if args.action == "list":
            for c in client.list_collections():
                params = ";".join(f"{k}={v}" for k, v in c.pooling_params.items())
                print(f"{c.name}\titems={c.count}\tmodel={c.model or '-'}\tpooling={c.pooling or '-'}"
                      f"{':' + params if params else ''}\tdim={c.dim}\tindex={c.index}\tmetric={c.metric}")
        elif args.action == "create":
            c = client.create_collection(args.name, model=args.model, pooling=args.pooling, metric=args.metric,
                                         index=args.index, dim=args.dim)
            print(f"created {c.name} (dim {c.dim}, pooling {c.pooling or '-'}, index {c.index})")
        else:
            print(f"dropped {args.name} ({client.drop_collection(args.name)} items)")
    return 0
