"""Counts the reliability and security suites report at the end of a run (what was tried, not
what passed: every one of them also asserts)."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()


def add(name: str, n: int = 1) -> None:
    COUNTS[name] += n


def summary() -> list[str]:
    from tests.simulation import FIGURES

    lines = []
    for name, f in sorted(FIGURES.items()):
        crashes = ", ".join(f"{k} {v}" for k, v in sorted(f.crashes.items()))
        ended = ", ".join(f"{k} {v}" for k, v in sorted(f.ended.items()))
        lines.append(f"simulation[{name}]: {f.sequences} sequences, {f.steps} steps ({f.commands} commands); "
                     f"jobs ended {sum(f.ended.values())} ({ended}); "
                     f"crashes injected: {sum(f.crashes.values())} ({crashes}); "
                     f"broker lost {f.dropped} and repeated {f.duplicated} messages; "
                     f"projector filled {f.filled} from the log, swept {f.swept}")
    lines.extend(f"{name}: {n}" for name, n in sorted(COUNTS.items()))
    return lines
