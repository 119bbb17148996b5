"""`optforge cpp-generate`: the CLI drives the C++ engine, and a broken artifact gives a clear error and exit 1."""

from __future__ import annotations

from typer.testing import CliRunner

from optforge.cli import app


def test_cpp_generate_prints_the_greedy_completion(rt, tiny_artifact):
    tok = rt.Tokenizer.from_file(str(tiny_artifact / "tokenizer.json"))
    expected, _ = rt.Engine(str(tiny_artifact), num_threads=1).generate([tok.encode("The quick brown fox")], max_new_tokens=6)
    res = CliRunner().invoke(app, ["cpp-generate", str(tiny_artifact), "The quick brown fox", "--max-new-tokens", "6", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout == tok.decode(expected[0]) + "\n"
    assert "tok/s decode" in res.stderr


def test_cpp_generate_reports_a_tampered_artifact(rt, tiny_artifact):
    (tiny_artifact / "config.json").write_text((tiny_artifact / "config.json").read_text() + " ")
    res = CliRunner().invoke(app, ["cpp-generate", str(tiny_artifact), "hi"])
    assert res.exit_code == 1
    assert "error:" in res.stderr and "config.json" in res.stderr
