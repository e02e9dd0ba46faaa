"""The slim client: importable without NumPy, OpenCV or Numba; its models read every verdict the schema
describes; ``verdicts(since=...)`` backfills from the journal, then goes on live, with no gap and no duplicate."""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import JournaledLine, journal_ids

from stream_service import client
from stream_service.errors import JournalError, TransportError
from stream_service.settings import JournalSettings
from stream_service.wire.messages import Region, Verdict, VerdictIds, utc_time, verdict_json_schema

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_importing_the_client_loads_no_numpy_opencv_or_numba() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import stream_service.client"],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert "zmq" in modules and "pydantic" in modules  # the measurement itself works
    assert not modules & {"numpy", "cv2", "numba"}, sorted(modules & {"numpy", "cv2", "numba"})


def test_the_client_models_have_every_field_of_the_published_schema() -> None:
    schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    assert set(schema["properties"]) == set(client.Verdict.model_fields)
    required = {name for name, f in client.Verdict.model_fields.items() if f.is_required()}
    assert required <= set(schema["required"])  # the client demands nothing the schema does not promise
    assert schema == verdict_json_schema()  # the file is the pipeline's own schema


def verdict_cases(make_verdict: Callable[..., Verdict]) -> list[Verdict]:
    ids = VerdictIds()
    now = time.time_ns()
    full = {
        "verdict_id": ids.new(now),
        "time": utc_time(now),
        "regions": (Region(x1=1, y1=2, x2=30, y2=40, score=0.9, area=1000),),
        "latency_ms": {"soartc": 4.0, "end_to_end": 9.5},
        "truth": {"label": "fail", "boxes": [[1, 2, 3, 4]]},
        "dropped": 3,
        "verdict": "fail",
        "score": 0.8,
    }
    older = {"schema_version": "1.0"}  # no verdict_id or time: a 1.0 verdict
    return [make_verdict("cam0", 0), make_verdict("cam1", 7, **full), make_verdict("cam0", 2, **older)]


def test_the_client_reads_every_kind_of_published_verdict(make_verdict: Callable[..., Verdict]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "schemas" / "verdict.v1.json").read_text())
    for v in verdict_cases(make_verdict):
        text = v.model_dump_json()
        jsonschema.validate(json.loads(text), schema)
        got = client.Verdict.model_validate_json(text)
        assert got.model_dump(mode="json") == json.loads(text)
    newer = json.loads(verdict_cases(make_verdict)[1].model_dump_json()) | {"schema_version": "1.9", "extra": 1}
    assert client.Verdict.model_validate(newer).schema_version == "1.9"  # a newer minor version still reads
    with pytest.raises(ValueError, match="schema_version"):
        client.Verdict.model_validate(newer | {"schema_version": "2.0"})


@pytest.fixture
def journaled(
    make_verdict: Callable[..., Verdict], journaled_line: Callable[..., JournaledLine]
) -> tuple[str, str, JournalSettings]:
    """An infer stage's outside: verdicts of cam0 journaled, then published, every 10 ms; the journal on REP."""
    ids = VerdictIds()

    def verdict_of(seq: int) -> Verdict:
        now = time.time_ns()
        return make_verdict("cam0", seq, verdict_id=ids.new(now), time=utc_time(now), capture_ns=now)

    line = journaled_line(verdict_of, 0.01)
    return line.pub, line.rep, line.settings


def test_the_client_backfills_from_the_journal_then_goes_on_live_without_gap_or_duplicate(
    journaled: tuple[str, str, JournalSettings],
) -> None:
    pub, rep, settings = journaled
    time.sleep(1.0)  # about 100 verdicts journaled before the client starts
    since = journal_ids(settings)[3]
    got = [v.verdict_id for v in itertools.islice(client.verdicts(pub, camera="cam0", since=since, journal=rep), 300)]
    ids = journal_ids(settings)
    start = ids.index(since) + 1
    assert got == ids[start : start + 300]  # replayed in pages of 7, then live: each once, in order


def test_the_client_names_an_unknown_since_and_an_absent_journal(journaled: tuple[str, str, JournalSettings]) -> None:
    pub, rep, _settings = journaled
    unknown = "01a23768-5eba-72a1-8876-7a619778c6d2"
    with pytest.raises(JournalError, match=f"journal at {rep}: since: expected the verdict_id of a verdict"):
        next(client.verdicts(pub, since=unknown, journal=rep))
    with pytest.raises(JournalError, match="since: expected a journal endpoint"):
        next(client.verdicts(pub, since=unknown))
    nobody = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(TransportError, match=f"journal at {nobody}: expected a reply within 300 ms"):
        next(client.verdicts(pub, since=unknown, journal=nobody, timeout_ms=300))
