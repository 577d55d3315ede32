"""The pure helpers that decide what a lineage folds next, and how a fold is split: no server."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from mergeflow.flows.queue import first_uncovered, order_pending, target_index, to_emit
from mergeflow.tasks.dask import split_groups
from mergeflow.tasks.values import CheckpointRef

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def ref(cid: str, minutes: float | None, digest: str | None = None, uri: str = "") -> CheckpointRef:
    when = None if minutes is None else T0 + timedelta(minutes=minutes)
    return CheckpointRef(
        id=cid, uri=uri or f"/src/{cid}", digest=digest or f"sha256:{cid}", published_at=when
    )


def test_order_pending_sorts_by_publication_then_source_then_id_and_skips_what_was_seen() -> None:
    a, b, c = ref("a", 3), ref("b", 1), ref("c", 1)
    other = ref("z", 2)
    undated = ref("u", None)
    got = order_pending([[a, b, c], [other, undated]], seen=set())
    assert [ck.id for ck in got] == ["u", "b", "c", "z", "a"]
    # seen by id, or by digest
    got = order_pending([[a, b, c], [other]], seen={"b", "sha256:z"})
    assert [ck.id for ck in got] == ["c", "a"]


def test_order_pending_counts_a_checkpoint_listed_by_two_sources_once() -> None:
    first = ref("x", 1, digest="sha256:same")
    again = ref("x-mirror", 1, digest="sha256:same")
    assert [ck.id for ck in order_pending([[first], [again]], seen=set())] == ["x"]


def test_target_index_matches_by_digest_then_by_id_and_uri() -> None:
    pending = [ref("a", 1), ref("b", 2, uri="/other/b"), ref("c", 3)]
    assert target_index(pending, "nope", digest="sha256:c") == 2
    assert target_index(pending, "b") == 1
    assert target_index(pending, "b", uri="/other/b") == 1
    assert target_index(pending, "b", uri="/src/b") is None  # same id, another checkpoint
    assert target_index(pending, "zz") is None
    assert target_index([], "a") is None


def test_first_uncovered_skips_everything_up_to_the_last_targeted_checkpoint() -> None:
    pending = [ref("a", 1), ref("b", 2), ref("c", 3)]
    assert first_uncovered(pending, set()) == 0
    assert first_uncovered(pending, {"b"}) == 2
    assert first_uncovered(pending, {"sha256:a", "c"}) == 3
    assert first_uncovered(pending, {"unrelated"}) == 0


def test_to_emit_names_only_the_newest_pending_checkpoint_unless_all_are_covered() -> None:
    pending = [ref("a", 1), ref("b", 2), ref("c", 3)]
    assert to_emit(pending, set()) == pending[2]  # one run folds a, b, then c
    assert to_emit(pending, {"b"}) == pending[2]
    assert to_emit(pending, {"sha256:c"}) is None  # a run already targets the newest
    assert to_emit(pending, {"c", "unrelated"}) is None
    assert to_emit([], set()) is None


def test_split_groups_keeps_order_balances_bytes_and_leaves_no_group_empty() -> None:
    assert split_groups([("a", 5), ("b", 1), ("c", 1), ("d", 5)], 3) == [["a"], ["b", "c"], ["d"]]
    assert split_groups([("a", 1)], 4) == [["a"]]
    assert split_groups([("a", 1), ("b", 1)], 0) == [["a", "b"]]
    sizes = [(f"t{i}", 1 + i % 3) for i in range(20)]
    groups = split_groups(sizes, 4)
    assert len(groups) == 4 and all(groups)
    assert [n for g in groups for n in g] == [n for n, _ in sizes]
    totals = [sum(dict(sizes)[n] for n in g) for g in groups]
    assert max(totals) - min(totals) <= 3
