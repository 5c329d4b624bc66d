"""The corridor decisions in-process (app/rates/corridors.py): what may be fetched, served, and how marked."""

from datetime import UTC, datetime, timedelta

import pytest

from app.currencies import Pair
from app.errors import Withheld
from app.rates.corridors import Corridor, Corridors, Mark, State
from app.rates.wire import RateItem
from app.storage.rate import StoredRate

USD_NGN, USD_KES = Pair("USD", "NGN"), Pair("USD", "KES")
NOW = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)


def corridor(state: State, reason: str = "upstream suspended it") -> Corridor:
    return Corridor(state, reason, NOW, "ops-alice")


def test_a_pair_without_an_entry_is_active_fetched_served_and_unmarked() -> None:
    corridors = Corridors()
    assert corridors.state(USD_NGN) is State.active
    assert corridors.may_fetch(USD_NGN, NOW) and corridors.served(USD_NGN)
    assert corridors.mark(USD_NGN) is None
    corridors.check_served(USD_NGN)


def test_paused_is_served_marked_and_not_fetched() -> None:
    corridors = Corridors()
    assert corridors.set(USD_NGN, corridor(State.paused), None) is State.active
    assert not corridors.may_fetch(USD_NGN, NOW) and corridors.served(USD_NGN)
    assert corridors.mark(USD_NGN) == Mark(State.paused, "upstream suspended it", NOW)
    assert corridors.fetchable([USD_NGN, USD_KES], NOW) == [USD_KES]


def test_withheld_is_neither_fetched_nor_served() -> None:
    corridors = Corridors()
    corridors.set(USD_NGN, corridor(State.withheld), None)
    assert not corridors.may_fetch(USD_NGN, NOW) and not corridors.served(USD_NGN)
    with pytest.raises(Withheld, match="withheld by the operator"):
        corridors.check_served(USD_NGN)


def test_resume_forgets_the_entry() -> None:
    corridors = Corridors()
    corridors.set(USD_NGN, corridor(State.paused), None)
    assert corridors.set(USD_NGN, corridor(State.active, "back"), None) is State.paused
    assert corridors.may_fetch(USD_NGN, NOW) and corridors.mark(USD_NGN) is None
    assert corridors.counts() == {State.active: 0, State.paused: 0, State.withheld: 0}


def test_an_override_stops_fetching_until_it_expires() -> None:
    corridors = Corridors()
    until = NOW + timedelta(seconds=60)
    corridors.set(USD_NGN, None, until)
    assert not corridors.may_fetch(USD_NGN, NOW) and corridors.overridden(USD_NGN, NOW)
    assert corridors.may_fetch(USD_NGN, until)  # expired: the next fetch replaces it
    assert corridors.mark(USD_NGN) is None  # an override is not a state: served as any rate, provider manual


def test_every_change_bumps_the_version_so_derived_answers_are_dropped() -> None:
    corridors = Corridors()
    versions = [corridors.version]
    corridors.set(USD_NGN, corridor(State.paused), None)
    versions.append(corridors.version)
    corridors.load({USD_KES: corridor(State.withheld)}, {})
    versions.append(corridors.version)
    assert versions == sorted(set(versions))
    assert corridors.state(USD_NGN) is State.active and corridors.state(USD_KES) is State.withheld


def test_the_rate_item_carries_the_mark_only_while_paused() -> None:
    rate = StoredRate(USD_NGN, 1, 1, 1, 1, "flutterwave", NOW, 7)  # type: ignore[arg-type]
    assert "corridor" not in RateItem.of(rate, stale=False).model_dump(mode="json")
    marked = RateItem.of(rate, stale=False, corridor=Mark(State.paused, "why", NOW)).model_dump(mode="json")
    assert marked["corridor"] == {"state": "paused", "reason": "why", "since": "2026-12-03T09:00:00Z"}
