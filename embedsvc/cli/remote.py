"""`embedsvc search` and `embedsvc collections ...`: talk to a running server through the client."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from embedsvc.cli import connect
from embedsvc.errors import InvalidInput

FILTER_HELP = (
    "metadata filter, repeatable, all must hold: KEY=7 (number), KEY=true (boolean), KEY=red or "
    'KEY="7" (string; quote for the shell: \'KEY="7"\'), KEY=a|b (any of), KEY>=X, KEY>X, KEY<=X, KEY<X '
    "(X a number); several clauses may share one --filter, separated by spaces"
)


def _client(args):
    return connect.client(args.address, args.timeout)


def _common(p) -> None:
    connect.add_address_arguments(p)


def register(sub) -> None:
    s = sub.add_parser("search")
    s.add_argument("collection")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text")
    q.add_argument("--image", help="image file")
    q.add_argument("--id", help="id of a stored item (more like this)")
    s.add_argument("-k", "--top-k", type=int, default=10)
    s.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE", help=FILTER_HELP)
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
    fit = actions.add_parser(
        "fit",
        help="fit a collection's learned pooling (NetVLAD codebook) on sample images",
        description="Fit the NetVLAD codebook of an empty collection on images sampled evenly "
        "from an image folder or manifest, through a server or --local.",
    )
    fit.add_argument("name", metavar="NAME[=POOLING]", help="the collection; NAME=POOLING creates it if missing")
    fit.add_argument("source", help="image folder, .csv/.jsonl/.parquet manifest or WebDataset .tar shards")
    fit.add_argument("--sample", type=int, default=500, metavar="N", help="images to fit on (default: 500)")
    fit.add_argument("--local", metavar="DATA_DIR", help="fit in-process in this data directory (no server)")
    fit.add_argument(
        "--index",
        default="",
        help="index type if the collection is created (default: flat); when given, an existing collection must have it",
    )
    _common(fit)
    c.set_defaults(run=run_collections)


def run_search(args) -> int:
    if args.id is not None and not args.id.strip():
        raise InvalidInput("--id is empty: give the id of a stored item (more like this)")
    query = {"text": args.text} if args.text is not None else {"id": args.id} if args.id is not None else None
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise InvalidInput(f"image file {path} does not exist")
        query = {"image": path}
    from embedsvc.client import UnknownFilterKeyWarning

    assert query is not None  # argparse requires one of --text, --image, --id
    with _client(args) as client, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnknownFilterKeyWarning)
        # the server parses the text (embedsvc.store.filter_text): one grammar for the CLI, the page and HTTP
        hits = client.search(args.collection, top_k=args.top_k, filter=" ".join(args.filter), **query)
    for warning in caught:  # ours as one line each; anything else as Python shows it
        if issubclass(warning.category, UnknownFilterKeyWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if args.json:
        json.dump([{"id": h.id, "score": h.score, "metadata": h.metadata} for h in hits], sys.stdout)
        print()
        return 0
    for rank, hit in enumerate(hits, 1):
        label = hit.metadata.get("caption") or json.dumps(hit.metadata)
        print(f"{rank:>3}  {hit.score:.4f}  {hit.id}  {label}")
    return 0


def run_collections(args) -> int:
    if args.action == "fit":
        return _run_fit(args)
    with _client(args) as client:
        if args.action == "list":
            for c in client.list_collections():
                params = ";".join(f"{k}={v}" for k, v in c.pooling_params.items())
                print(
                    f"{c.name}\titems={c.count}\tmodel={c.model or '-'}\tpooling={c.pooling or '-'}"
                    f"{':' + params if params else ''}\tdim={c.dim}\tindex={c.index}\tmetric={c.metric}"
                )
        elif args.action == "create":
            c = client.create_collection(
                args.name, model=args.model, pooling=args.pooling, metric=args.metric, index=args.index, dim=args.dim
            )
            print(f"created {c.name} (dim {c.dim}, pooling {c.pooling or '-'}, index {c.index})")
        else:
            print(f"dropped {args.name} ({client.drop_collection(args.name)} items)")
    return 0


def _run_fit(args) -> int:
    from embedsvc.jobs.index import IndexJob, run_fit

    if args.sample < 1:
        raise InvalidInput(f"--sample must be at least 1, got {args.sample}")
    job = IndexJob(
        args.source, [args.name], local=args.local, address=args.address, index=args.index, token=connect.token() or ""
    )
    for fitted in run_fit(job, args.sample):
        print(f"fitted {fitted.name} on {fitted.images} images ({fitted.descriptors} token descriptors)")
    return 0
