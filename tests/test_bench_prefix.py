"""`bench.prefix` end to end on a very small configuration: both paths run, agree, and the
result carries the timings and load averages it promises."""

import json

from bench import prefix


def test_bench_prefix_smoke(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    argv = ["--hidden", "64", "--layers", "1", "--prompts", "2", "--group_size", "2",
            "--prompt_tokens", "12", "--response_tokens", "6", "--micro_batch_size", "3",
            "--repeats", "2", "--out", str(out)]
    assert prefix.main(argv) == 0
    result = json.loads(out.read_text())
    assert result == json.loads(capsys.readouterr().out)
    assert result["max_abs_logprob_diff"] < 1e-4
    assert all(len(v) == 2 for v in result["seconds"].values())
    assert result["speedup"] > 0 and len(result["loadavg_before"]) == 3
    assert 3 * 2 * 2 * 3 <= result["response_tokens_scored"] <= 3 * 2 * 2 * 6
