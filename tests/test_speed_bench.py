"""The speed benchmarks' own code on the CPU: bench/gpu_check.py --smoke (the GPU check's every setting at test
size) and a one-prompt run of bench/bench_step_cache.py on the bundled demo model."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_step_cache
import gpu_check


def rows(text: str) -> dict[str, str]:
    """The table's rows: setting -> check."""
    found = re.findall(r"^\| (.+?) \| [\d.]+ \| [\d.-]+ \| (.*) \|$", text, flags=re.M)
    return {name: check for name, check in found if name != "setting"}


def test_gpu_check_smoke_runs_every_setting_and_the_exact_ones_are_exact(capsys):
    assert gpu_check.main(["--smoke"]) == 0
    table = rows(capsys.readouterr().out)
    for variant in ("5b", "2b", "1.5"):  # Mimir's denoising is diffusers' on the same streams
        assert table[f"{variant} denoise, diffusers CogVideoXPipeline, same streams"] == "max abs diff 0 vs Mimir"
    exact = {"5b block swap (1 of 2 blocks, offload device cpu)": "vs resident", "5b attention native": "vs default",
             "5b compile (eager), second run": "vs eager"}
    for name, reference in exact.items():
        assert table[name] == f"max abs diff 0 {reference}", name
    approximations = [n for n in table if n.startswith("5b step cache") and "calibration" not in n]
    assert len(approximations) == len(gpu_check.STEP_CACHES)
    assert all(float(table[n].split()[3]) > 0 for n in approximations if "fbc" not in n)  # they skip work
    assert float(table["5b fp8 weight storage (e4m3fn, blocks)"].split()[3]) > 0
    (training,) = [check for name, check in table.items() if name.startswith("training")]
    assert re.fullmatch(r"losses [\d.e+-]+ -> [\d.e+-]+", training)
    assert len(table) >= 25


def test_step_cache_benchmark_rows(monkeypatch):
    monkeypatch.setattr(bench_step_cache, "TARGET", {**bench_step_cache.TARGET, "psnr": 0.0, "points": 100.0})
    out = bench_step_cache.run(prompts=1, caches=("taylorseer:3",))
    assert [r.name.split(",")[0] for r in out] == ["step cache taylorseer (interval 3)", "step cache"]
    assert out[0].value > 0 and "PSNR" in out[0].detail and out[1].value == out[0].value
