"""``python -m flows.score bless``: write the golden rows every run checks first.

No Prefect here: blessing reads a sample, loads each member into its own graph and
session, scores the rows and writes one small Parquet file (see ``tasks.golden``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

EPILOG = """\
The golden file holds the id, the feature columns by name and each member's score as
score_<name>, with the members' checkpoint digests, the TensorFlow version and the CPU
path in its footer. Name it in the manifest (golden: golden.parquet, relative to the
manifest's folder); every run then scores these rows with every member before touching
any partition and refuses to go on if a member deviates by more than golden_tolerance
(default 1e-4). Bless again whenever a change of scores is intended.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.score bless",
        description="Score a small, evenly spaced sample of real rows with every member and "
        "keep them, with the scores, as the golden file every run checks first.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", metavar="MANIFEST", required=True, help="models manifest")
    p.add_argument("--sample", metavar="PATH", required=True,
                   help="Parquet data to sample: a file, a folder or a glob (as --input)")
    p.add_argument("--rows", type=int, default=1000, metavar="N",
                   help="rows to keep, spread evenly over the sample (default: 1000)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="golden file to write (default: golden.parquet beside the manifest, "
                   "or the manifest's 'golden' when it names one)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.rows <= 100_000:
        print("error: --rows must be between 1 and 100000", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.strip():
        print("error: --out is empty; give the golden file's path, or leave --out out",
              file=sys.stderr)
        return 2
    from loaders.errors import ScoringError
    from tasks.runtime import set_up

    set_up(debug=args.debug)
    try:
        return _bless(args)
    except ScoringError as err:
        if args.debug:
            raise
        print(f"error: {err}\nNothing was blessed.", file=sys.stderr)
        return 2


def _check_out(out: Path, sample: str) -> None:
    """Refuse a golden file inside the sample's folder (the next run would score it as a
    partition) or below something that is not a folder.

    Raises:
        OutputError: naming the path and what to do.
    """
    from loaders.errors import DataError, OutputError
    from tasks.fs import is_s3

    target = out.resolve()
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"cannot write the golden file {out}: {parent} is a file, not a "
                          "folder; give another --out")
    if is_s3(sample):
        return
    root = Path(sample).expanduser()
    if not any(c in str(root) for c in "*?[") and not root.exists():
        raise DataError(f"the sample {sample} does not exist; check --sample")
    folder = root.resolve() if root.is_dir() else root.resolve().parent
    if folder in [target, *target.parents]:
        raise OutputError(f"the golden file {out} would be inside the sample folder {folder}, "
                          "where runs reading that folder would score it as data; give "
                          "--out outside it (or move the manifest)")


def _bless(args: argparse.Namespace) -> int:
    from loaders._tf import tf
    from loaders.cache import MODEL_CACHE
    from loaders.cpu import cpu_path
    from loaders.manifest import load_manifest
    from tasks.golden import bless, sample_rows

    manifest = load_manifest(args.models)
    manifest_dir = Path(args.models).expanduser().resolve().parent
    out = (Path(args.out).expanduser() if args.out
           else Path(manifest.golden) if manifest.golden else manifest_dir / "golden.parquet")
    _check_out(out, args.sample)
    sample, dropped = sample_rows(args.sample, manifest, args.rows)
    scorers = {s.name: MODEL_CACHE.get(s, len(manifest.features)) for s in manifest.models}
    path = cpu_path()
    table = bless(manifest, sample, scorers, out,
                  provenance={"tensorflow": tf.__version__, "cpu_path": path.label,
                              "sample": args.sample})
    note = f" ({dropped} sampled row(s) with bad features or no id left out)" if dropped else ""
    print(f"Blessed {table.num_rows:,} row(s) from {args.sample} with "
          f"{len(scorers)} member(s){note} into {out.resolve()}")
    try:
        named = out.resolve().relative_to(manifest_dir)
    except ValueError:
        named = out.resolve()
    if manifest.golden is None or Path(manifest.golden) != out.resolve():
        print(f"Add to the manifest: golden: {named}")
    return 0
