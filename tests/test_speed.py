"""Speed gates: the verdict on synthetic paired rounds, recipe validation, caching by machine fingerprint."""

import math

import pytest

from optforge import speed
from optforge.errors import RecipeError
from optforge.evals.stats import paired_log_ratio_interval, t_quantile
from optforge.recipe import GateSpec, parse_recipe
from optforge.recipe_speed import SpeedSpec

MACHINE = {"cpu": "test cpu", "cores": 2, "gpu": None, "torch": "x", "platform": "test"}


def _rounds(base: list[float], factors: list[float], metric: str = "decode_tok_s") -> dict:
    return {"baseline": [{metric: b} for b in base], "candidate": [{metric: b * f} for b, f in zip(base, factors)]}


def _gate(rounds: dict, **spec) -> speed.SpeedGateResult:
    return speed.evaluate_speed_gate(GateSpec(**spec), rounds, machine=MACHINE, workload={})


BASE = [100.0, 104.0, 97.0, 101.0, 99.0]  # machine drift the pairing cancels


def test_t_quantile_matches_tables():
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-2)
    assert t_quantile(0.95, 9) == pytest.approx(1.8331, abs=1e-3)


def test_the_interval_is_a_t_interval_on_log_ratios():
    interval = paired_log_ratio_interval([1.0, 1.0, 1.0], [2.0, 2.2, 1.8])
    d = [math.log(2.0), math.log(2.2), math.log(1.8)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert interval.diff == pytest.approx(mean)
    assert interval.high - interval.diff == pytest.approx(t_quantile(0.975, 2) * sd / math.sqrt(3), rel=1e-6)


def test_clearly_faster_passes():
    result = _gate(_rounds(BASE, [2.0, 2.02, 1.98, 2.01, 1.99]), metric="decode_tok_s", min_speedup=1.2)
    assert result.verdict == "pass" and result.passed
    assert result.speedup == pytest.approx(2.0, rel=0.01) and result.speedup_low > 1.2
    assert result.baseline == pytest.approx(math.exp(sum(map(math.log, BASE)) / 5))


def test_clearly_slower_fails():
    result = _gate(_rounds(BASE, [0.70, 0.72, 0.69, 0.71, 0.70]), metric="decode_tok_s", max_slowdown=1.05)
    assert result.verdict == "fail" and not result.passed
    assert result.speedup_high < 1 / 1.05 and result.required == pytest.approx(1 / 1.05)
    assert "speedup 0.70" in result.describe() and ": fail" in result.describe()


def test_lower_is_better_metrics_are_oriented_so_speedup_above_one_is_better():
    rounds = _rounds([1.0, 1.1, 0.9], [0.5, 0.51, 0.49], metric="ttft_p90_s")  # TTFT halves
    result = _gate(rounds, metric="ttft_p90_s", min_speedup=1.5)
    assert result.speedup == pytest.approx(2.0, rel=0.02) and result.verdict == "pass"
    assert result.threshold == pytest.approx(result.baseline / 1.5)


def test_noise_over_the_threshold_is_undecided_with_a_repeat_count():
    result = _gate(_rounds(BASE, [1.35, 1.05, 1.30, 1.10, 1.25]), metric="decode_tok_s", min_speedup=1.2)
    assert result.verdict == "undecided" and not result.passed  # on_undecided defaults to fail
    assert result.needed_n is not None and result.needed_n > result.n
    text = result.describe()
    assert "the noise (±" in text and f"about {result.needed_n - result.n} more repeats would decide" in text
    lenient = _gate(_rounds(BASE, [1.35, 1.05, 1.30, 1.10, 1.25]), metric="decode_tok_s", min_speedup=1.2, on_undecided="pass")
    assert lenient.verdict == "undecided" and lenient.passed


def test_a_metric_that_was_not_measured_fails():
    rounds = {"baseline": [{"peak_memory_gb": 1.0}] * 3, "candidate": [{"peak_memory_gb": float("nan")}] * 3}
    result = _gate(rounds, metric="peak_memory_gb", max_slowdown=1.1)
    assert result.verdict == "fail" and result.method == "not finite" and "cannot be judged" in result.describe()


# ------------------------------------------------------------------------------------------- recipes


def _recipe(tiny_model_dir, tmp_path, make_recipe, gate: dict, speed_spec: dict | None = {"repeats": 3}) -> dict:
    data = make_recipe(tiny_model_dir, tmp_path / "out", passes=[{"name": "quant.int8_weight_only", "gate": gate}])
    if speed_spec is not None:
        data["data"]["speed"] = speed_spec
    return data


@pytest.mark.parametrize(
    "gate, speed_spec, key, words",
    [
        ({"metric": "decode_tok_s", "min_speedup": 1.2}, None, "", "passes[0].gate reads speed metric 'decode_tok_s', but data.speed declares no workload"),
        ({"metric": "decode_tok_s", "max_drop": 1.0}, {}, "passes[0].gate", "min_speedup (e.g. 1.2) or max_slowdown"),
        ({"metric": "decode_tok_s", "min_speedup": 1.2, "max_slowdown": 1.1}, {}, "passes[0].gate", "exactly one threshold"),
        ({"metric": "perplexity", "min_speedup": 1.2}, {}, "passes[0].gate", "speed metrics only"),
        ({"metric": "decode_tok_s", "max_slowdown": 0.9}, {}, "passes[0].gate.max_slowdown", "greater than or equal to 1"),
        ({"metric": "decode_tok_s", "min_speedup": 1.2}, {"repeat": 5}, "data.speed", "Did you mean 'repeats'?"),
        ({"metric": "decode_tok_s", "min_speedup": 1.2}, {"repeats": 1}, "data.speed.repeats", "greater than or equal to 2"),
        ({"metric": "decode_tok_s", "min_speedup": 1.2}, {"concurrency": 8, "num_requests": 4}, "data.speed", "exceeds num_requests"),
        ({"metric": "decode_tok_s", "min_speedup": 1.2}, {"backend": "tensorrt"}, "data.speed.backend", "'torch' or 'cpp'"),
    ],
)
def test_recipe_errors_name_the_key(tiny_model_dir, tmp_path, make_recipe, gate, speed_spec, key, words):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(_recipe(tiny_model_dir, tmp_path, make_recipe, gate, speed_spec), source="r.yaml")
    assert f"r.yaml: {key}" in str(exc.value) and words in str(exc.value)


def test_a_valid_speed_recipe_parses(tiny_model_dir, tmp_path, make_recipe):
    data = _recipe(tiny_model_dir, tmp_path, make_recipe, [{"metric": "perplexity", "max_increase_pct": 5}, {"metric": "ttft_p90_s", "max_slowdown": 1.05}],
                   {"input_len": 64, "output_len": 32, "repeats": 5, "threads": 2, "backend": "cpp"})
    recipe = parse_recipe(data)
    assert recipe.data.speed == SpeedSpec(input_len=64, output_len=32, repeats=5, threads=2, backend="cpp")
    assert [g.metric for g in recipe.passes[0].gates()] == ["perplexity", "ttft_p90_s"]


# ------------------------------------------------------------------------------------------- caching


class _Artifact:
    def __init__(self, path, digest):
        self.path, self.digest = path, digest


def test_speed_is_cached_per_machine(tmp_path, monkeypatch):
    from optforge.cache import Cache

    calls = []

    def fake_round(path, spec, dtype):
        calls.append(str(path))
        return {"decode_tok_s": 100.0 if str(path) == "base" else 150.0}

    monkeypatch.setattr(speed, "run_round", fake_round)
    monkeypatch.setattr(speed, "machine_fingerprint", lambda spec: MACHINE)
    cache, spec = Cache(tmp_path / "cache"), SpeedSpec(repeats=3)
    base, cand = _Artifact("base", "a" * 64), _Artifact("cand", "b" * 64)
    rounds, machine, cached = speed.measure_speed(base, cand, spec, dtype="float32", cache=cache)
    assert calls == ["base", "cand"] * 3 and not cached and machine == MACHINE  # interleaved A B A B A B
    again, _, cached = speed.measure_speed(base, cand, spec, dtype="float32", cache=cache)
    assert cached and again == rounds and len(calls) == 6
    monkeypatch.setattr(speed, "machine_fingerprint", lambda spec: {**MACHINE, "cpu": "another cpu"})
    _, machine, cached = speed.measure_speed(base, cand, spec, dtype="float32", cache=cache)
    assert not cached and len(calls) == 12 and machine["cpu"] == "another cpu"
    _, _, cached = speed.measure_speed(base, cand, SpeedSpec(repeats=3, input_len=64), dtype="float32", cache=cache)
    assert not cached  # another workload


def test_the_fingerprint_names_the_machine():
    fp = speed.machine_fingerprint(SpeedSpec())
    assert fp["cores"] and fp["cpu"] and fp["torch"] and fp["gpu"] is None
