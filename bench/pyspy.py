"""Summaries of py-spy's collapsed stacks ("frame;frame;... count" lines), shared by the benchmarks."""

import collections
import re
from collections.abc import Callable, Iterable
from pathlib import Path


def summarise(
    raw_path: Path,
    top: int = 15,
    categorise: Callable[[list[str]], str] | None = None,
    leave_out: Iterable[str] = (),
) -> None:
    """Print self and inclusive shares by function, and by kind when `categorise` names a kind per stack."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        if categorise is not None:
            kinds[categorise(frames)] += count
    if not total:
        print(f"  no samples in {raw_path}")
        return
    if categorise is not None:
        print(f"  {total} samples; by kind:")
        for name, count in kinds.most_common():
            print(f"    {100 * count / total:5.1f}%  {name}")
    print("  self time by function:")
    for frame, count in own.most_common(top):
        print(f"    {100 * count / total:5.1f}%  {frame}")
    print("  inclusive time by function (frames in nearly every sample left out):")
    left_out = tuple(leave_out)
    shown = [
        (frame, count)
        for frame, count in inclusive.most_common()
        if count < 0.97 * total and not any(part in frame for part in left_out)
    ]
    for frame, count in shown[: 2 * top]:
        print(f"    {100 * count / total:5.1f}%  {frame}")
