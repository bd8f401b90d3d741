"""`embedsvc compare`: compare poolings on a captioned data set; writes a table, JSON and plots."""

from __future__ import annotations

import sys

from embedsvc.cli.models import add_model_arguments, model_options
from embedsvc.jobs.compare import DEFAULT_POOLINGS, DEFAULT_SCENES, MAX_DEFAULT_PAIRS, CompareJob


def register(sub) -> None:
    p = sub.add_parser("compare")
    p.add_argument("--data", default="scenes", help="'scenes' (generated test split) or a manifest with captions")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="N",
        help=f"pairs to compare: scenes, the first N of the test split (default: {DEFAULT_SCENES}); a "
        f"manifest, a seeded random sample of N rows (default: every row with a caption, at most "
        f"{MAX_DEFAULT_PAIRS:,}; a cut is announced)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the random sample of manifest rows (default: 0); refused with --data scenes",
    )
    p.add_argument(
        "--pooling",
        dest="poolings",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"repeatable (default: {' '.join(DEFAULT_POOLINGS)}); e.g. netvlad:clusters=32;pca_dim=256",
    )
    p.add_argument("--index", default="flat", help="index preset for the collections (default: flat)")
    add_model_arguments(p)
    p.add_argument(
        "--label-column",
        default="auto",
        metavar="COLUMN",
        help="manifest column of class labels: images of one class are relevant to each other and to "
        "each other's captions (default: 'label' or 'class' when present; '' for captions only)",
    )
    p.add_argument("--out-dir", default="compare-out")
    p.add_argument(
        "--train-head",
        type=int,
        default=0,
        metavar="N",
        help="also train an attention-pooling head on frozen tokens of N training scenes (e.g. 5000)",
    )
    p.add_argument("--head-steps", type=int, default=400)
    p.set_defaults(run=run)


def run(args) -> int:
    from embedsvc.jobs.compare import markdown_table, relevance_note, run_compare, sample_note, unmeasured_notes

    job = CompareJob(
        data=args.data,
        size=args.size,
        seed=args.seed,
        poolings=tuple(args.poolings or DEFAULT_POOLINGS),
        index=args.index,
        model=model_options(args),
        label_column=args.label_column,
        out_dir=args.out_dir,
        train_head=args.train_head,
        head_steps=args.head_steps,
    )
    result = run_compare(job)
    for row in result["skipped"][:20]:
        print(f"  skipped {row['path']}: {row['reason']}", file=sys.stderr)
    if result["skipped"]:
        print(
            f"skipped {len(result['skipped'])} manifest rows that could not be used (all listed in "
            f"{job.out_dir}/results.json)",
            file=sys.stderr,
        )
    if result["sample"]:
        print(sample_note(result), file=sys.stderr)
    note = relevance_note(result)
    print(note, file=sys.stderr if note.startswith("warning") else sys.stdout)
    print(markdown_table(result))
    for line in unmeasured_notes(result):
        print(line, file=sys.stderr)
    print(f"\nwrote {job.out_dir}/results.md, results.json, recall_per_pooling.png, recall_vs_bytes.png")
    return 0
