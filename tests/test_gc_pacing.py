"""Full garbage collections come due during a poll cycle but run after it, by CPython's own rule, timed."""

import gc

from prometheus_client import CollectorRegistry, Histogram

from app.kit.tasks import running
from app.live.gc_pacing import CollectionPacer
from tests.support.waiting import eventually


def collections(histogram: Histogram) -> float:
    return next(sample.value for sample in histogram.collect()[0].samples if sample.name.endswith("_count"))


async def thresholds_put_back(before: tuple[int, int, int]) -> None:
    await eventually(
        gc.get_threshold, until=lambda now: now == before, what=f"gc thresholds put back to {before}", interval_s=0.01
    )


def outlive_younger_collections(threshold: int) -> list[list[int]]:
    """Objects that reach the oldest generation, as many as a full collection keeps and more: one is due."""
    kept = [[n] for n in range(50_000)]
    for _ in range(threshold + 1):
        gc.collect(1)
    return kept


async def test_during_a_cycle_no_full_collection_starts_and_the_due_one_runs_after_it() -> None:
    seconds = Histogram("gc_test_seconds", "test", registry=CollectorRegistry())
    before = gc.get_threshold()
    async with CollectionPacer(seconds, settle_s=0.0, max_gap_s=3600) as pacer:
        assert gc.get_freeze_count() > 0
        async with running(pacer.run(), "pacer"):
            assert gc.get_threshold() == before  # between cycles, CPython collects as usual
            gc.collect()  # timed, like every full collection; and what it keeps is the measure of "enough"
            assert collections(seconds) == 1
            pacer.rates_moving()
            assert gc.get_threshold()[2] > 10_000 and gc.get_threshold()[:2] == before[:2]
            kept = outlive_younger_collections(before[2])
            # Enough to make CPython due a full collection; young ones go on, a full one never starts.
            churn = [[n] for n in range(10 * before[0])]
            assert gc.get_count()[2] > before[2]
            assert collections(seconds) == 1
            pacer.cycle_ended()
            await thresholds_put_back(before)
            # CPython's next young collection finds the full one due, and runs it.
            churn = [[n] for n in range(10 * before[0])]
            assert collections(seconds) == 2
            assert gc.get_count()[2] < before[2]
            del kept, churn
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_a_cycle_that_never_ends_is_given_up_on() -> None:
    seconds = Histogram("gc_test_seconds", "test", registry=CollectorRegistry())
    before = gc.get_threshold()
    async with CollectionPacer(seconds, max_gap_s=0.05) as pacer, running(pacer.run(), "pacer"):
        pacer.rates_moving()
        assert gc.get_threshold() != before
        await thresholds_put_back(before)


async def test_after_a_cycle_no_full_collection_is_forced_when_cpython_would_not_run_one() -> None:
    seconds = Histogram("gc_test_seconds", "test", registry=CollectorRegistry())
    before = gc.get_threshold()
    async with CollectionPacer(seconds, settle_s=0.0, max_gap_s=3600) as pacer, running(pacer.run(), "pacer"):
        # Many long-lived objects (10,000 connections' worth, in the service): a full collection is due only
        # once a quarter as many again have joined them, which a cycle's short-lived objects never do.
        settled = [[n] for n in range(200_000)]
        gc.collect()
        timed = collections(seconds)
        pacer.rates_moving()
        for _ in range(before[2] + 1):
            gc.collect(1)
        pacer.cycle_ended()
        await thresholds_put_back(before)
        churn = [[n] for n in range(10 * before[0])]
        assert collections(seconds) == timed, "none forced after the cycle"
        del settled, churn
