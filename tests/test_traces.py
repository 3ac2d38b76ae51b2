import pytest

from conftest import TRACES
from gemini_sim.failures import traces
from gemini_sim.errors import UserError

GOOD = "time_hours,kind,machines,note\n1.5,hardware,1,a\n2,software,2,\"b, with comma\"\n"


def test_bundled_bloom_trace_loads_with_attribution():
    t = traces.load_trace(TRACES / "bloom176b.csv")
    assert len(t.events) == 6 and t.duration_h == 2608 and t.source_machines == 48 and not t.synthetic
    assert t.kind_counts() == {"hardware": 2, "software": 3, "network": 0, "unknown": 1}
    assert (TRACES / "bloom176b.SOURCE.md").exists()
    for csv in TRACES.glob("*.csv"):
        assert (TRACES / f"{csv.stem}.SOURCE.md").exists(), f"{csv.name} lacks a SOURCE.md"


def test_parse_and_round_trip():
    t = traces.parse_trace(GOOD, "x.csv")
    assert [e.machines for e in t.events] == [1, 2] and t.events[1].note == "b, with comma"
    assert t.duration_h == 2  # defaults to the last failure
    again = traces.parse_trace(t.to_csv(), "x.csv")
    assert again.events == t.events and again.duration_h == t.duration_h


def test_a_byte_order_mark_is_dropped(tmp_path):
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufefftime_hours,kind,machines,note\n1,hardware,1,a\n".encode())
    assert [e.time_h for e in traces.load_trace(f).events] == [1.0]
    f.write_bytes(b"time_hours,kind,machines,note\n1,hardware,1,\xff\n")
    with pytest.raises(UserError, match="not UTF-8"):
        traces.load_trace(f)


@pytest.mark.parametrize("text, where", [
    ("time_hours,kind,machines,note\n1,hardware,1,a\nabc,hardware,1,b\n", "bad.csv:3: field 'time_hours'"),
    ("time_hours,kind,machines,note\n5,hardware,1,a\n4,hardware,1,b\n", "bad.csv:3: field 'time_hours'"),
    ("time_hours,kind,machines,note\n1,cosmic,1,a\n", "bad.csv:2: field 'kind'"),
    ("time_hours,kind,machines,note\n1,hardware,two,a\n", "bad.csv:2: field 'machines'"),
    ("time_hours,kind,machines,note\n1,hardware,0,a\n", "bad.csv:2: field 'machines'"),
    ("time_hours,kind,machines,note\n-1,hardware,1,a\n", "bad.csv:2: field 'time_hours'"),
    ("time_hours,kind,note\n1,hardware,a\n", "bad.csv:1: missing column 'machines'"),
    ("", "bad.csv: empty trace"),
    ("# duration_hours: 3\n", "bad.csv: empty trace"),
    ("time_hours,kind,machines,note\n", "bad.csv: empty trace"),
    ("# duration_hours: 1\ntime_hours,kind,machines,note\n5,hardware,1,a\n", "field 'duration_hours'"),
    ("# duration_hours: nan\ntime_hours,kind,machines,note\n5,hardware,1,a\n", "bad.csv:1: field 'duration_hours'"),
    ("# duration_hours: inf\ntime_hours,kind,machines,note\n5,hardware,1,a\n", "bad.csv:1: field 'duration_hours'"),
    ("# source: x\n# machines: -3\ntime_hours,kind,machines,note\n5,hardware,1,a\n", "bad.csv:2: field 'machines'"),
    ("# machines: 1e3\ntime_hours,kind,machines,note\n5,hardware,1,a\n", "bad.csv:1: field 'machines'"),
    ("time_hours,kind,machines,note\n1,hardware,1,a,extra\n", "bad.csv:2: field 'note': row has 5 fields"),
    ("time_hours,kind,machines,note\n1,hardware,1\n", "bad.csv:2: field 'note': row has 3 fields"),
    ("time_hours,kind,machines,note,rack\n1,hardware,1,a,3\n", "bad.csv:1: unexpected or repeated column 'rack'"),
    ("time_hours,kind,machines,note,note\n1,hardware,1,a,b\n", "repeated column 'note'"),
    ("time_hours,kind,machines,note\n1e300,hardware,1,a\n", "bad.csv:2: field 'time_hours'"),
    ("time_hours,kind,machines,note\n1,hardware,99999999999,a\n", "bad.csv:2: field 'machines'"),
    ('time_hours,kind,machines,note\n1,hardware,1,"unclosed\n', "bad.csv:2: malformed CSV"),
])
def test_malformed_traces_name_file_line_field(tmp_path, text, where):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(UserError) as exc:
        traces.load_trace(f)
    msg = str(exc.value)
    assert where in msg and "\n" not in msg


def test_cli_malformed_trace_exit_2_no_traceback(tmp_path, cli):
    f = tmp_path / "bad.csv"
    f.write_text("time_hours,kind,machines,note\n1,hardware,1,a\n0.5,software,1,b\n")
    rc, out, err = cli("replay", "--trace", f, check_rc=2)
    assert err.strip().count("\n") == 0 and f"{f}:3: field 'time_hours'" in err and "Traceback" not in err
    assert out == ""
