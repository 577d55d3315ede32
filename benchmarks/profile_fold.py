"""Where one OPCM fold spends its time: cProfile of the second fold (the first projected one).

    .venv/bin/python benchmarks/profile_fold.py [--suite vit-b32] [--top 12]

Builds (or reuses) the suite's inputs through ``benchmarks/compare.py``, folds checkpoints 0
and 1 into a fresh state, profiling only the second fold, and prints the functions with the
most cumulative and the most own time. Run it with ``PYTHONPATH=<an older checkout>`` to
profile another version of the engine on the same inputs (the numbers in
``benchmarks/README.md`` compare the engine before and after issue 8 this way).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="vit-b32")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    import compare

    import mergeflow
    from mergeflow.architecture import resolve_projection
    from mergeflow.merging import engine
    from mergeflow.merging.state import BaseRef

    try:
        from mergeflow.storage import states
        from mergeflow.storage.objects import LocalStore
        from mergeflow.storage.schemes import open_checkpoint

        fold_into = states.fold_into
    except ImportError:  # the engine before the restructure
        from mergeflow.storage.store import LocalStore  # type: ignore[no-redef]

        from mergeflow.storage import state_store as states  # type: ignore[no-redef]
        from mergeflow.storage.checkpoints import open_checkpoint  # type: ignore[no-redef]

        fold_into = states.fold_checkpoint

    base, cks = compare.build(args.suite)
    b = open_checkpoint(str(base))
    info = engine.new_state(
        "opcm", {}, BaseRef(uri=str(base), digest="-"), resolve_projection(b.reader, None)
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        states.init_state(store, info)
        c0 = open_checkpoint(str(cks[0]), base=b.reader)
        fold_into(store, store, b.reader, c0, checkpoint_id="c0", digest="d0")
        c1 = open_checkpoint(str(cks[1]), base=b.reader)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        fold_into(store, store, b.reader, c1, checkpoint_id="c1", digest="d1")
        prof.disable()
        wall = time.perf_counter() - t0
    print(f"{mergeflow.__file__}: one projected fold of {args.suite} in {wall:.2f} s")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        print("\n".join(ln for ln in s.getvalue().splitlines() if ln.strip())[:6000])


if __name__ == "__main__":
    main()
