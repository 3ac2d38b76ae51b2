"""Files the user names (gemini_sim/files.py): strict JSON and TOML in, outputs checked before the work and written
atomically, and the same rules through every verb of the command line."""

import json
import os
import time

import pytest

from gemini_sim import files
from gemini_sim.errors import UserError


@pytest.mark.parametrize("text, needle", [
    ('{"a": NaN}', "NaN is not allowed"),
    ('{"a": Infinity}', "Infinity is not allowed"),
    ('[-Infinity]', "-Infinity is not allowed"),
    ('{"a": 1e400}', "number 1e400 is out of range"),
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": {"b": 1, "b": 1}}', "duplicate key 'b'"),
    ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels"),
    ("1" * 5000, "invalid JSON"),  # Python refuses integers of more than 4300 digits
    ('{"a": 1', "invalid JSON at line 1"),
    ("", "invalid JSON at line 1"),
])
def test_json_in_is_strict(text, needle):
    with pytest.raises(UserError) as exc:
        files.parse_json(text, "x.json")
    assert needle in str(exc.value) and str(exc.value).startswith("x.json: ") and "\n" not in str(exc.value)


def test_json_depth_limit_ignores_brackets_in_strings():
    deep_string = json.dumps({"note": "[" * 1000 + '\\"{' * 100})
    assert files.parse_json(deep_string, "x")["note"].startswith("[[[")
    assert files.parse_json("[" * 64 + "]" * 64, "x") is not None
    with pytest.raises(UserError, match="nested"):
        files.parse_json("[" * 65 + "]" * 65, "x")


def test_json_out_is_strict():
    assert files.dumps({"a": 1.5}) == '{\n  "a": 1.5\n}'
    with pytest.raises(ValueError):
        files.dumps({"a": float("nan")})


def test_read_text_drops_the_bom_and_refuses_folders_and_binary(tmp_path):
    f = tmp_path / "a.json"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert files.load_json(f, "plan") == {"a": 1}
    f.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        files.load_json(f, "plan")
    with pytest.raises(UserError, match="is a folder"):
        files.read_text(tmp_path, "trace")
    with pytest.raises(UserError, match="cannot read trace"):
        files.read_text(tmp_path / "missing.csv", "trace")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e400"])
def test_toml_refuses_non_finite_numbers(tmp_path, value):
    f = tmp_path / "c.toml"
    f.write_text(f"x = {value}\n")
    with pytest.raises(UserError, match="out of range"):
        files.load_toml(f, "config")


def test_output_file_checks(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert files.output_file(tmp_path / "new" / "deeper" / "p.json", "-o") == tmp_path / "new" / "deeper" / "p.json"
    for path, needle in [(tmp_path, "is a folder"), (tmp_path / "afile" / "p.png", "is a file, not a folder"),
                         (tmp_path / "plot", "must end in .png, .pdf, .svg"),
                         (tmp_path / "plot.jpeg", "must end in")]:
        with pytest.raises(UserError, match=needle):
            files.output_file(path, "--plot", files.FIGURE_SUFFIXES)
    with pytest.raises(UserError, match="is a file, not a folder"):
        files.output_dir(tmp_path / "afile", "--out")
    assert files.output_dir(tmp_path / "x" / "y", "--out") == tmp_path / "x" / "y"
    assert not (tmp_path / "x").exists()  # checking creates nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_in_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(UserError, match="not writable"):
        files.output_file(ro / "p.json", "-o")


def test_write_atomic_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    f = tmp_path / "p.json"
    files.write_json(f, {"v": 1})
    with pytest.raises(ValueError):
        files.write_json(f, {"v": float("inf")})  # refused before anything is written

    def interrupted(src, dst):
        raise KeyboardInterrupt  # Ctrl-C between the write and the rename

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        files.write_json(f, {"v": 2})
    assert json.loads(f.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]  # no temporary file left behind


def test_save_figure_writes_exactly_the_named_file(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    files.save_figure(fig, tmp_path / "a.svg")
    files.save_figure(fig, tmp_path / "b.png")
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg", "b.png"]


# --- through the command line: outputs are checked before the work, inputs strictly ----------------------------

def test_outputs_are_checked_before_the_work(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = [
        (["plan", "--synthetic", "poisson", "-o", tmp_path], "-o"),
        (["plan", "--synthetic", "poisson", "-o", tmp_path / "afile" / "p.json"], "is a file, not a folder"),
        (["plan", "--synthetic", "poisson", "-o", tmp_path / "p.json", "--plot", tmp_path / "plots"], "must end in"),
        (["interleave", "--plot", tmp_path], "is a folder"),
        (["interleave", "--export-plan", tmp_path], "is a folder"),
        (["placement", "--machines", "8", "--replicas", "2", "--failures", "1-3", "--plot", tmp_path / "x"],
         "must end in"),
        (["replay", "--synthetic", "poisson", "--out", tmp_path / "afile"], "is a file, not a folder"),
        (["synth", "--synthetic", "poisson", "-o", tmp_path], "is a folder"),
        (["sweep", "no-spec.toml", "--out", tmp_path / "afile"], "is a file, not a folder"),
    ]
    for argv, needle in cases:
        start = time.monotonic()
        rc, out, err = cli(*argv, check_rc=None)
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert time.monotonic() - start < 60, argv  # refused at once, not after the optimisation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_missing_output_folders_are_created(cli, tmp_path):
    cli("synth", "--synthetic", "poisson", "--days", "2", "-o", tmp_path / "a" / "b" / "t.csv")
    cli("placement", "--machines", "8", "--replicas", "2", "--failures", "1-3", "--plot", tmp_path / "c" / "p.svg")
    assert (tmp_path / "a" / "b" / "t.csv").read_text().startswith("# duration_hours")
    assert (tmp_path / "c" / "p.svg").exists()


def test_two_traces_with_one_name_are_refused_with_out(cli, tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.csv").write_text("time_hours,kind,machines,note\n1,hardware,1,x\n")
    rc, _, err = cli("replay", "--trace", tmp_path / "a" / "t.csv", tmp_path / "b" / "t.csv", "--out",
                     tmp_path / "out", check_rc=2)
    assert "two traces are named 't'" in err


@pytest.mark.parametrize("body", ['{"schema_version": NaN}', '{"a": 1, "a": 1}', "[" * 100000])
def test_plan_and_profile_readers_refuse_non_strict_json(cli, tmp_path, body):
    f = tmp_path / "p.json"
    f.write_text(body)
    for argv in (["plan", "validate", f], ["interleave", "--profile", f]):
        rc, _, err = cli(*argv, check_rc=2)
        assert err.startswith(f"gemini-sim: error: {f}: ") and len(err.strip().splitlines()) == 1
