"""Shared helpers for the routing tests: a stand-in complexity scorer and the calibration prompts.

The stand-in is deliberately simple and deterministic (length plus a few keywords); the routing code only
relies on the ``score(prompt) -> float in [0, 1]`` contract, which the shipped scorer also meets.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

GIB = 1 << 30
CALIBRATION_CSV = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "routing" / "routellm_calibration.csv"
)
_KEYWORDS = ("prove", "derive", "theorem", "integral", "algorithm", "step by step", "def ", "class ")
HARD = "Prove step by step that there are infinitely many primes."
EASY = "hi"


class StandInScorer:
    """Scores by length (saturating at 1500 characters) plus 0.7 for hard-sounding keywords."""

    def __init__(self) -> None:
        self.calls = 0
        self.longest_seen = 0

    def score(self, prompt: str) -> float:
        prompt.encode("utf-8")  # strict: proves the router never hands over lone surrogates
        self.calls += 1
        self.longest_seen = max(self.longest_seen, len(prompt))
        lowered = prompt.lower()
        keyword = 0.7 if any(word in lowered for word in _KEYWORDS) else 0.0
        return min(1.0, 0.6 * min(1.0, len(prompt) / 1500) + keyword)

    def explain(self, prompt: str) -> dict[str, Any]:
        lowered = prompt.lower()
        return {
            "score": self.score(prompt),
            "dimensions": {
                "length": min(1.0, len(prompt) / 1500),
                "keywords": 1.0 if any(word in lowered for word in _KEYWORDS) else 0.0,
            },
        }


class FixedScorer:
    """Returns whatever ``value`` is set to (tests flip it between easy and hard)."""

    def __init__(self, value: float = 0.9) -> None:
        self.value = value

    def score(self, prompt: str) -> float:
        return self.value


def calibration_prompts(limit: int) -> list[str]:
    """The first ``limit`` prompts of the RouteLLM calibration set (skips the test when it is absent)."""
    if not CALIBRATION_CSV.exists():
        pytest.skip(f"calibration data not found at {CALIBRATION_CSV}")
    prompts = []
    with CALIBRATION_CSV.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            prompts.append(row["prompt"])
            if len(prompts) >= limit:
                break
    return prompts
