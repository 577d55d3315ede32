"""`mergeflow stats`: compute a checkpoint's ``mergeflow_stats.safetensors`` (Grams, Fisher)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mergeflow.errors import ConfigError
from mergeflow.evaluation.data import data_format
from mergeflow.evaluation.statistics import FISHER_LABELS, stats_for_checkpoint
from mergeflow.merging.engine import resolve_device
from mergeflow.merging.stats import STATS_FILE
from mergeflow.storage.schemes import open_checkpoint, read_uri


def _count(text: str) -> int:
    """A non-negative integer argument."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def register(sub: Any) -> None:
    """Add `stats` to the `mergeflow` sub-command parsers."""
    p = sub.add_parser(
        "stats",
        help="compute a checkpoint's statistics (Gram matrices, diagonal Fisher) for data-informed merging",
        description=(
            "Build CHECKPOINT's model from its config.json and weights, run it over calibration data and write "
            f"OUT in the mergeflow.stats/1 format (publish it as {STATS_FILE} beside the weights): "
            "'<weight>:gram', the mean over non-padding tokens of x xᵀ of each nn.Linear's inputs, and "
            "'<param>:fisher', the mean over examples of the squared gradient of log p(y|x). "
            "Data files are .npz, .safetensors or .parquet with 'x' and/or model inputs (input_ids, "
            "attention_mask, ...) and optional labels ('labels' or 'y'). "
            "Exit 0 on success; bad input exits 2 with one message and writes nothing."
        ),
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="checkpoint folder or URI with config.json"
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="URI",
        help="calibration data file (.npz, .safetensors, .parquet), local or s3://...; repeatable, read in order",
    )
    p.add_argument("--out", required=True, metavar="FILE", help=f"output file, e.g. {STATS_FILE}")
    p.add_argument(
        "--batch-size", type=_count, default=32, help="examples per forward (default: 32)"
    )
    p.add_argument(
        "--max-examples",
        type=_count,
        default=256,
        help="examples used in all, from the data files in order (default: 256; 0: every one)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the model runs (default: auto = cuda when available, else cpu)",
    )
    p.add_argument("--no-gram", action="store_true", help="skip the Gram matrices")
    p.add_argument("--no-fisher", action="store_true", help="skip the diagonal Fisher")
    p.add_argument(
        "--fisher-labels",
        choices=list(FISHER_LABELS),
        default="auto",
        help="the y of log p(y|x): the data's labels (empirical), the model's argmax (predicted), "
        "or auto = labels when the data has them, else predictions (default: auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (stderr)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)"
    )
    p.set_defaults(func=cmd_stats)


def _read_data(uri: str) -> bytes:
    """The bytes of one calibration data file."""
    try:
        return read_uri(uri)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"calibration data {uri!r} does not exist or is not a file") from None


def cmd_stats(args: argparse.Namespace) -> int:
    """Compute the statistics of one checkpoint and write them atomically to OUT."""
    start = time.perf_counter()
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.no_gram and args.no_fisher:
        raise ConfigError("--no-gram and --no-fisher leave nothing to compute")
    out = Path(args.out).expanduser().absolute()
    if out.is_dir():
        raise ConfigError(f"output {args.out} is a folder; --out names a file")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"output {args.out} already exists; pass --overwrite to replace it")
    device = str(resolve_device(args.device))
    for uri in args.data:
        data_format(uri)  # an unknown extension is reported before any read
    ck = open_checkpoint(args.checkpoint)
    if ck.config is None:
        raise ConfigError(
            f"checkpoint {args.checkpoint} has no config.json; mergeflow stats builds the model from it"
        )
    data = [(uri, _read_data(uri)) for uri in args.data]
    tensors = {k: ck.reader.get(k) for k in ck.reader.keys()}
    stats, metadata = stats_for_checkpoint(
        ck.config,
        tensors,
        data,
        batch_size=args.batch_size,
        max_examples=args.max_examples or None,
        device=device,
        grams=not args.no_gram,
        fisher=not args.no_fisher,
        fisher_labels=args.fisher_labels,
        progress=not args.no_progress,
        source=ck.uri,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(
            tmp, "wb"
        ):  # created with the umask's mode, which safetensors' 0600 would not keep
            mode = tmp.stat().st_mode & 0o777
        save_file(stats, str(tmp), metadata=metadata)
        tmp.chmod(mode)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    grams = sum(k.endswith(":gram") for k in stats)
    print(
        f"wrote {args.out}: {grams} grams, {len(stats) - grams} fishers, {metadata['examples']} examples, "
        f"{metadata['tokens']} tokens in {time.perf_counter() - start:.1f} s",
        file=sys.stdout,
    )
    return 0
