"""`optforge generate --backend cpp` (what `optforge cpp-generate` was): the CLI drives the C++ model and prints
its greedy completion; a tampered artifact gives a clear error and exit 2."""

from __future__ import annotations

from typer.testing import CliRunner

from optforge.cli import app


def test_generate_cpp_prints_the_greedy_completion_of_the_engine(rt, tiny_artifact):
    tok = rt.Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    expected, _ = rt.Engine(str(tiny_artifact), num_threads=1).generate([tok.encode("The quick brown fox")], max_new_tokens=6)
    res = CliRunner().invoke(app, ["generate", str(tiny_artifact), "The quick brown fox", "--backend", "cpp", "--max-tokens", "6", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout == tok.decode(expected[0]) + "\n"


def test_generate_cpp_reports_a_tampered_artifact(rt, tiny_artifact):
    (tiny_artifact / "config.json").write_text((tiny_artifact / "config.json").read_text() + " ")
    res = CliRunner().invoke(app, ["generate", str(tiny_artifact), "hi", "--backend", "cpp"])
    assert res.exit_code == 2
    assert "error" in res.stderr and "config.json" in res.stderr


def test_cpp_generate_is_gone():
    assert CliRunner().invoke(app, ["cpp-generate", "x", "y"]).exit_code == 2
