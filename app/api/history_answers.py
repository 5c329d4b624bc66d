"""Answers of `/api/rates/history`, kept until their pair next changes (docs/rest.md).

A range of 5,000 points costs a read of 5,000 rows and their encoding; asked
again, it is the same answer until the pair gets a new point. Each answer is
kept with the version of its pair's history it was made from (the id of the
pair's newest row, `repository.latest_history_id`: one row read from the end
of an index), and served only while that is still the newest. The version is
read from the database on every request, so a point stored by any replica
shows at once; no event has to arrive first.

Bounded by the bytes held (`MAX_BYTES`), the least recently served forgotten
first.
"""

from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from app.currencies import Pair

MAX_BYTES = 32 * 1024 * 1024
# An answer bigger than this is made each time rather than push out many smaller ones.
MAX_ANSWER_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Question:
    pair: Pair
    since: datetime | None
    until: datetime | None
    limit: int
    csv: bool


@dataclass(frozen=True, slots=True)
class Answer:
    version: int | None
    body: bytes
    media_type: str
    headers: tuple[tuple[str, str], ...]


class HistoryAnswers:
    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._answers: OrderedDict[Question, Answer] = OrderedDict()
        self.hits = 0
        """Answers served from here: what a test of the cache counts."""

    def get(self, question: Question, version: int | None) -> Answer | None:
        answer = self._answers.get(question)
        if answer is None or answer.version != version:
            return None
        self._answers.move_to_end(question)
        self.hits += 1
        return answer

    def put(self, question: Question, answer: Answer) -> None:
        if len(answer.body) > min(MAX_ANSWER_BYTES, self._max_bytes):
            return
        self._drop(question)
        self._answers[question] = answer
        self._bytes += len(answer.body)
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._answers)))

    def _drop(self, question: Question) -> None:
        old = self._answers.pop(question, None)
        if old is not None:
            self._bytes -= len(old.body)

    def __len__(self) -> int:
        return len(self._answers)
