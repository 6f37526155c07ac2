"""``vlmtrain eval ARTIFACT_DIR --data-root DIR``: score an artifact, write eval.json / eval.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

CLI_OWNER = "vlmtrain eval"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vlmtrain eval", description="Exact-match evaluation of a stage artifact."
    )
    p.add_argument("artifact_dir", type=Path, help="a stage's artifact/ directory")
    p.add_argument("--data-root", type=Path, required=True, help="shapes data directory")
    p.add_argument("--splits", nargs="+", default=["test", "test_unseen"])
    p.add_argument("--limit", type=int, default=None, help="first N samples of each file")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: ARTIFACT_DIR/../eval-cli (the stage's own eval/ is never overwritten "
        "unless --out names it and --overwrite is given)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = p.parse_args(argv)

    import torch  # after argparse, so --help stays instant

    from vlmtrain.eval.report import format_table, write_report
    from vlmtrain.eval.shapes_eval import evaluate_artifact
    from vlmtrain.records import evaluation_owner, mark_evaluated

    # resolve() so that "artifact" given as a relative path still has a real parent.
    out = args.out or args.artifact_dir.resolve().parent / "eval-cli"
    if (out / "eval.json").is_file() and not args.overwrite and evaluation_owner(out) != CLI_OWNER:
        print(
            f"vlmtrain eval: {out} holds a stage's own evaluation; pass --overwrite to replace "
            "it, or --out another directory",
            file=sys.stderr,
        )
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    results = evaluate_artifact(
        args.artifact_dir,
        args.data_root,
        tuple(args.splits),
        args.limit,
        batch_size=args.batch_size,
        device=device,
    )
    json_path, md_path = write_report(results, out)
    mark_evaluated(out, args.artifact_dir, owner=CLI_OWNER, splits=list(args.splits))
    print(format_table(results), end="")
    print(f"\n{json_path}\n{md_path}\n({time.perf_counter() - t0:.1f} s on {device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
