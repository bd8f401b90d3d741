"""`embedsvc index`: bulk indexing of an image folder, a manifest or WebDataset shards."""

from __future__ import annotations

import dataclasses
import sys

from embedsvc.cli import connect
from embedsvc.cli.models import add_model_arguments, model_options, resolve_model
from embedsvc.errors import InvalidInput
from embedsvc.jobs.index import IndexJob

HELP = {
    "index": "index type of collections this job creates (default: flat); when given, existing targets must have it",
    "max_image_bytes": f"larger image files are skipped and reported, never read (default: the server's default "
    f"max_image_bytes, {IndexJob.max_image_bytes})",
}


def register(sub) -> None:
    p = sub.add_parser(
        "index",
        description="Index an image folder, a .csv/.jsonl/.parquet manifest or WebDataset .tar "
        "shards. Re-running skips what is already stored.",
    )
    p.add_argument("source")
    p.add_argument(
        "--collection",
        dest="collections",
        action="append",
        required=True,
        metavar="NAME[=POOLING]",
        help="target collection, repeatable; NAME=POOLING creates it if missing (e.g. photos=cls)",
    )
    p.add_argument(
        "--local",
        metavar="DATA_DIR|MILVUS_URI",
        help="write in-process into this data directory, or into "
        "Milvus (milvus:///path/file.db for Milvus Lite, http://host:19530), with no server",
    )
    add_model_arguments(p, what="the model of collections this job creates", default="the server's default model")
    p.add_argument("--address", default=connect.default_address(), help=connect.address_help())
    for name in (
        "index",
        "batch_size",
        "workers",
        "report",
        "device",
        "engine",
        "ray_actors",
        "ray_address",
        "fit_sample",
        "max_image_bytes",
    ):
        f = next(x for x in dataclasses.fields(IndexJob) if x.name == name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=f.default,
            type=int if isinstance(f.default, int) else str,
            help=HELP.get(name, f"(default: {f.default})"),
        )
    p.set_defaults(run=run)


def run(args) -> int:
    from embedsvc.jobs.index import run_index

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(IndexJob) if f.name not in ("model", "token")}
    values["token"] = connect.token() or ""
    options = model_options(args)
    loads_here = options.has_weight_source or args.models_file or args.model_config
    if loads_here and not args.local:
        raise InvalidInput(
            "--pretrained, --checkpoint, --model-config and --models-file load a model in this "
            "process: add --local DATA_DIR, or register the model with the server "
            "(`embedsvc serve --models-file FILE`) and pass --model NAME"
        )
    values["model"] = resolve_model(args).name if args.local and (loads_here or options.models_file) else options.model
    job = IndexJob(**values)
    summary = run_index(job)
    print(
        f"indexed {summary.indexed}, already present {summary.already_present}, failed {len(summary.failed)} "
        f"of {summary.total} in {summary.seconds:.1f}s; failures in {job.report}"
    )
    for source, reason in summary.failed[:20]:
        print(f"  failed {printable(source)}: {printable(reason)}", file=sys.stderr)
    if summary.failed and not summary.indexed and not summary.already_present:
        print(
            f"embedsvc index: nothing was indexed: all {len(summary.failed)} paths failed (reasons above and in "
            f"{job.report})",
            file=sys.stderr,
        )
        return 1
    return 0


def printable(text: str) -> str:
    """text with control and unprintable characters escaped as in Python literals: a file named with a newline or
    a terminal escape sequence can neither forge report lines nor drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
