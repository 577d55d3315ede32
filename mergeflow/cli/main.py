"""The ``mergeflow`` command line.

Bad input exits 2 with one ``mergeflow: error: ...`` line on stderr and leaves no output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence

import mergeflow.cli.pool
import mergeflow.cli.stats
from mergeflow.architecture import resolve_projection, resolve_vocab
from mergeflow.cli.args import parse_key_values, parse_ratio, parse_size
from mergeflow.cli.output import Output, write_model
from mergeflow.errors import CheckpointError, ConfigError, MergeflowError, StateError
from mergeflow.merging import batch, engine
from mergeflow.merging.engine import resolve_device
from mergeflow.merging.methods import get_method, method_table
from mergeflow.merging.state import BaseRef, FoldOptions
from mergeflow.merging.stats import STATS_FILE
from mergeflow.storage import states, vocab
from mergeflow.storage.objects import LocalStore
from mergeflow.storage.schemes import open_checkpoint, open_store
from mergeflow.storage.vocab_files import model_files


def _common_fold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="where each tensor's math runs: cpu, cuda or auto (default: auto = cuda when available, else cpu); IO always streams through the CPU",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt/.pth weights, loaded only with torch.load(weights_only=True) (default: refused)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar (shown on stderr by default)",
    )
    p.add_argument(
        "--max-task-vector-ratio",
        type=parse_ratio,
        default=1.0,
        metavar="R|none",
        help="refuse a checkpoint whose ‖τ‖/‖θ₀‖ exceeds R, i.e. one most likely not fine-tuned from BASE "
        "(default 1.0, as lineages; none turns the check off). Folds sum the norms as they read; "
        "batch and pool merges read each checkpoint once more for it",
    )


def _state_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="method parameter, repeatable (see `mergeflow methods` for names and defaults)",
    )
    p.add_argument(
        "--project-regex",
        metavar="REGEX",
        help="OPCM: project exactly the 2-D float tensors whose name matches REGEX (default: nn.Linear weights found from the base's config.json, else name rules that exclude embeddings)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the arithmetic and the state tensors (default: float32)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="treat a tensor the base has but a checkpoint lacks as a zero task vector (default: refuse the checkpoint)",
    )
    p.add_argument(
        "--vocab",
        choices=["base", "union"],
        default="base",
        help="tokens a checkpoint adds (vocabulary rows are matched by token through the tokenizers): "
        "base leaves their rows out (default); union grows the merged vocabulary and its tokenizer",
    )


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=parse_size("5GB"),
        help="largest output shard, e.g. 5GB, 500MB, 2GiB (default: 5GB); larger models get shards plus model.safetensors.index.json",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "float64"],
        help="output dtype of floating-point tensors (default: the base's dtype per tensor)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergeflow",
        description="Keep one merged model current as fine-tuned checkpoints arrive.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "merge",
        help="merge checkpoints into a base, streaming one tensor at a time",
        description=(
            "Fold CHECKPOINTs into BASE in the given order with a continual METHOD (or merge them at once with a batch_* method) "
            "and write the merged model to OUT_DIR with the base's tensor names and dtype. BASE and each CHECKPOINT may be a folder "
            "(model.safetensors, sharded with model.safetensors.index.json, or a PEFT LoRA adapter for checkpoints) or a .safetensors file; "
            "s3://, hf:// and mlflow:// URIs work with the pipeline extra. Exit 0 on success; bad input exits 2 with one message and writes nothing."
        ),
    )
    p.add_argument(
        "--base", required=True, help="the base model all checkpoints were fine-tuned from"
    )
    p.add_argument(
        "--method",
        required=True,
        help="merging method (see `mergeflow methods`): opcm, task_arithmetic, weight_average, magmax, ties, dop, nufilt, adamerging, regmean, fisher, batch_*, fw_merging, fw_soft",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT_DIR",
        help="output folder; written to a temporary folder and renamed at the end",
    )
    _state_options(p)
    _output_options(p)
    _common_fold_options(p)
    p.add_argument("--calibration", metavar="SUITE", help=mergeflow.cli.pool.CALIBRATION_HELP)
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="fine-tuned checkpoints, folded in this order",
    )
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("methods", help="list every merging method with its parameters and defaults")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)

    st = sub.add_parser(
        "state", help="resumable merging: init a state, fold checkpoints into it, export it"
    ).add_subparsers(dest="state_command", metavar="ACTION", required=True)
    p = st.add_parser(
        "init",
        help="create an empty (step 0) state for a continual method",
        description="Create an empty merge state in a folder or s3:// prefix.",
    )
    p.add_argument(
        "--state", required=True, help="state folder or s3:// prefix (must not hold a state yet)"
    )
    p.add_argument("--base", required=True, help="the base model")
    p.add_argument("--method", required=True, help="continual method (see `mergeflow methods`)")
    _state_options(p)
    p.set_defaults(func=cmd_state_init)

    p = st.add_parser(
        "fold",
        help="fold checkpoints into a saved state, one after another",
        description="Fold CHECKPOINTs into the state in order. Each fold writes the new state tensors first and state.json last, so an interrupted fold leaves the previous state intact. A checkpoint already folded (same id or digest) is refused.",
    )
    p.add_argument("--state", required=True, help="state folder or s3:// prefix")
    p.add_argument("--base", help="the base model (default: the URI recorded in the state)")
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=states.DEFAULT_SHARD,
        help="largest state shard (default: 1GiB; each finished shard is stored while the next is folded)",
    )
    _common_fold_options(p)
    p.add_argument("--calibration", metavar="SUITE", help=mergeflow.cli.pool.CALIBRATION_HELP)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.set_defaults(func=cmd_state_fold)

    p = st.add_parser(
        "export",
        help="write the merged model of a state",
        description="Write base + scale * state to OUT_DIR.",
    )
    p.add_argument("--state", required=True, help="state folder or s3:// prefix")
    p.add_argument("--base", help="the base model (default: the URI recorded in the state)")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    _output_options(p)
    _common_fold_options(p)
    p.set_defaults(func=cmd_state_export)

    p = st.add_parser(
        "show", help="print a state's method, step, scalars and folded checkpoints as JSON"
    )
    p.add_argument("--state", required=True)
    p.set_defaults(func=cmd_state_show)

    mergeflow.cli.stats.register(sub)

    for mod in ("mergeflow.cli.services", "mergeflow.cli.pipeline"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        module.register(sub)
    return parser


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False)


def _device(args: argparse.Namespace) -> str:

    return str(resolve_device(args.device))


def _open_base(uri: str):

    return open_checkpoint(uri)


def _open_checkpoints(uris: Sequence[str], base, allow_pickle: bool):

    return [open_checkpoint(u, base=base.reader, allow_pickle=allow_pickle) for u in uris]


def _new_info(args: argparse.Namespace, base):

    projection = resolve_projection(base.reader, base.config, args.project_regex)
    options = FoldOptions(
        compute_dtype=args.compute_dtype,
        missing="zero" if args.allow_missing else "error",
        vocab=args.vocab,
    )
    return engine.new_state(
        args.method,
        parse_key_values(args.param),
        BaseRef(uri=base.uri, digest=base.digest()),
        projection,
        options,
        resolve_vocab(base.reader, base.config),
    )


def _validate(info, base, cks) -> None:
    """Every checkpoint's headers (and statistics, for a method that reads them) before any work."""
    for c in cks:
        vocab.check(info.vocab, info.options, base, c)
        if engine.needs_statistics(info) and c.stats(base.reader) is None:
            raise CheckpointError(
                c.uri,
                f"method {info.method!r} needs the statistics of every checkpoint, and this one "
                f"carries no {STATS_FILE}; compute one with `mergeflow stats`",
            )


def _objective(args, info, base, folded, suite, device):
    """A merge's objective for its next fold (None for a method that does not learn)."""
    if suite is None:
        return None
    keys = set(base.reader.keys())
    heads = {c.uri: mergeflow.cli.pool.head_of(c.reader, keys) for c in folded}
    return mergeflow.cli.pool.fold_objective(suite, base, heads, dict(info.params), device)


def _note(info, checkpoint_id: str) -> None:
    """Say what a fold did to the vocabulary (tokens left out or added), if anything."""
    line = vocab.note(info, checkpoint_id)
    if line:
        print(line, file=sys.stderr)


def cmd_merge(args: argparse.Namespace) -> int:

    method = get_method(args.method)
    device = _device(args)
    base = _open_base(args.base)
    cks = _open_checkpoints(args.checkpoints, base, args.allow_pickle)
    if method.kind != "continual":  # rows aligned by token, new tokens left out
        base, cks, notes = vocab.aligned(
            resolve_vocab(base.reader, base.config), args.vocab, base, cks
        )
        for line in notes:
            print(line, file=sys.stderr)
    if method.kind != "continual" and args.max_task_vector_ratio is not None:
        screen = FoldOptions(compute_dtype=args.compute_dtype)
        for c in cks:  # before any output: a fold sums these norms itself
            engine.screen_task_vector_ratio(
                base.reader, c.reader, screen, args.max_task_vector_ratio
            )
    with Output(args.out, args.overwrite) as out:
        if method.kind == "pool":
            params = parse_key_values(args.param)
            write_model(
                out.tmp,
                base,
                lambda w: mergeflow.cli.pool.merge_pool(args, base, cks, params, w, device),
                args.max_shard_size,
            )
            return 0
        if method.kind == "batch":
            options = FoldOptions(
                compute_dtype=args.compute_dtype, missing="zero" if args.allow_missing else "error"
            )
            write_model(
                out.tmp,
                base,
                lambda w: batch.batch_merge(
                    args.method,
                    parse_key_values(args.param),
                    base.reader,
                    [c.reader for c in cks],
                    w,
                    options=options,
                    dtype=args.dtype,
                    device=device,
                    progress=_progress(args),
                ),
                args.max_shard_size,
            )
            return 0
        info = _new_info(args, base)
        _validate(info, base, cks)
        suite = (
            mergeflow.cli.pool.require_calibration(args, info.method)
            if engine.needs_objective(info)
            else None
        )
        work = out.tmp.parent / f".{out.final.name}.state-{os.getpid()}"
        try:
            store = LocalStore(work)
            states.init_state(store, info)
            for i, c in enumerate(cks):
                m = states.fold_into(
                    store,
                    store,
                    base,
                    c,
                    device=device,
                    progress=_progress(args),
                    objective=_objective(args, info, base, cks[: i + 1], suite, device),
                    max_task_vector_ratio=args.max_task_vector_ratio,
                )
                _note(m.info, c.uri)

            def write(w):
                return states.export_state(
                    store, base.reader, w, dtype=args.dtype, device=device, progress=_progress(args)
                )

            manifest = states.read_manifest(store)
            files = model_files(manifest.info, base, states.vocab_folder(store, manifest))
            write_model(out.tmp, base, write, args.max_shard_size, files)
            (out.tmp / "mergeflow.json").write_text(
                json.dumps(states.summary(manifest) | {"tensors": None, "heads": {}}, indent=2)
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:

    rows = method_table()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        print(f"{r['name']}  ({r['kind']})\n    {r['summary']}")
        for p in r["params"]:
            print(
                f"    --param {p['name']}=<{p['type']}>  default {p['default']!r}: {p['description']}"
            )
        if not r["params"]:
            print("    (no parameters)")
        print()
    return 0


def _open_state(uri: str):

    return open_store(uri)


def cmd_state_init(args: argparse.Namespace) -> int:

    store = _open_state(args.state)
    if states.has_state(store):
        raise ConfigError(f"a merge state already exists at {args.state}")
    base = _open_base(args.base)
    info = _new_info(args, base)
    states.init_state(store, info)
    rows = f", {info.vocab.rows} vocabulary rows" if info.vocab is not None else ""
    print(
        f"initialised {args.method} state at {args.state} (vocab: {args.vocab}{rows})",
        file=sys.stderr,
    )
    return 0


def cmd_state_fold(args: argparse.Namespace) -> int:

    store = _open_state(args.state)
    manifest = states.read_manifest(store)
    device = _device(args)
    base = _open_base(args.base or manifest.info.base.uri)
    if base.digest() != manifest.info.base.digest:
        raise StateError(
            f"base {base.uri} has digest {base.digest()} but the state was built on {manifest.info.base.uri} ({manifest.info.base.digest})"
        )
    cks = _open_checkpoints(args.checkpoints, base, args.allow_pickle)
    _validate(manifest.info, base, cks)
    learns = engine.needs_objective(manifest.info)
    suite = mergeflow.cli.pool.require_calibration(args, manifest.info.method) if learns else None
    for c in cks:
        objective = None
        if suite is not None:
            m0 = states.read_manifest(store)
            heads = mergeflow.cli.pool.state_heads(store, m0)
            heads[c.uri] = mergeflow.cli.pool.head_of(c.reader, set(base.reader.keys()))
            objective = mergeflow.cli.pool.fold_objective(
                suite, base, heads, dict(m0.info.params), device
            )
        m = states.fold_into(
            store,
            store,
            base,
            c,
            device=device,
            max_shard_size=args.max_shard_size,
            progress=_progress(args),
            objective=objective,
            max_task_vector_ratio=args.max_task_vector_ratio,
        )
        print(f"folded {c.uri} as step {m.info.step}", file=sys.stderr)
        _note(m.info, c.uri)
    return 0


def cmd_state_export(args: argparse.Namespace) -> int:

    store = _open_state(args.state)
    manifest = states.read_manifest(store)
    device = _device(args)
    base = _open_base(args.base or manifest.info.base.uri)
    with Output(args.out, args.overwrite) as out:
        write_model(
            out.tmp,
            base,
            lambda w: states.export_state(
                store, base.reader, w, dtype=args.dtype, device=device, progress=_progress(args)
            ),
            args.max_shard_size,
            model_files(manifest.info, base, states.vocab_folder(store, manifest)),
        )
        (out.tmp / "mergeflow.json").write_text(json.dumps(states.summary(manifest), indent=2))
    return 0


def cmd_state_show(args: argparse.Namespace) -> int:

    print(json.dumps(states.summary(states.read_manifest(_open_state(args.state))), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MergeflowError as e:
        print(f"mergeflow: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"mergeflow: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("mergeflow: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
