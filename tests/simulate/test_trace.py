from __future__ import annotations

from pathlib import Path

import pytest

from xpuflow.errors import ConfigError
from xpuflow.scheduling.request import Priority
from xpuflow.simulate import load_trace
from xpuflow.simulate.trace import resolve_trace


def test_own_jsonl_and_csv(tmp_path: Path) -> None:
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        '{"arrival_s": 10.5, "input_tokens": 100, "output_tokens": 5, "priority": "high"}\n\n'
        '{"arrival_s": 10.0, "input_tokens": 7, "output_tokens": 0}\n'
    )
    rows = load_trace(str(jsonl))
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in rows] == [(0.0, 7, 1), (0.5, 100, 5)]
    assert rows[1].priority is Priority.HIGH
    csv = tmp_path / "t.csv"
    csv.write_text("arrival_s,input_tokens,output_tokens\n0,10,20\n1.5,11,21\n")
    assert len(load_trace(str(csv))) == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"arrival_s": 1, "input_tokens": 3}\n', r"t.jsonl:1: field 'output_tokens' is missing"),
        ('{"arrival_s": 1, "input_tokens": 3, "output_tokens": 1}\nnot json\n', r"t.jsonl:2: not JSON"),
        (
            '{"arrival_s": 1, "input_tokens": "x", "output_tokens": 1}\n',
            r":1: field 'input_tokens' is not a number",
        ),
        ('{"arrival_s": -1, "input_tokens": 1, "output_tokens": 1}\n', r"field 'arrival_s' must be a finite"),
    ],
)
def test_malformed_rows_name_line_and_field(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_trace(str(path))


def test_csv_header_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("time,in,out\n1,2,3\n")
    with pytest.raises(ConfigError, match="missing arrival_s"):
        load_trace(str(path))


def test_missing_trace_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"not in {tmp_path}"):
        resolve_trace("azure-conv", [tmp_path])


def test_named_traces_slice(traces_dir: Path) -> None:
    rows = load_trace("azure-conv", [traces_dir], start_s=60, duration_s=30)
    assert rows
    assert rows[0].arrival_s == 0.0
    assert rows[-1].arrival_s < 30
    assert len(load_trace("mooncake", [traces_dir], limit=50)) == 50
    assert len(load_trace("azure-code", [traces_dir], limit=20)) == 20
