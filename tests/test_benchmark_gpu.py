"""benchmarks/gpu.py holds issue 13's GPU figures for the sessions lent a GPU; its CPU smoke run keeps it working."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_the_gpu_benchmark_runs_end_to_end_at_toy_sizes_on_the_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke"])
    out = capsys.readouterr().out
    assert out.startswith("# device: CPU")
    rates = {row: float(rate) for row, rate in re.findall(r"\| \((a|b|c)\) [^|]*\| (\d+) \|", out)}
    assert set(rates) == {"a", "b", "c"} and all(rate > 0 for rate in rates.values())
    train_row = re.search(r"\| float32 \| False \| ([\d.]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", out)
    assert train_row and all(float(train_row.group(i)) > 0 for i in (1, 3, 4))
    assert "largest bf16 batch that fits: 16" in out  # the search doubled 8 -> 16, its smoke cap


def test_train_only_makes_its_store_with_one_stage_run_and_prints_no_encode_rows(capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--train-only"])
    out = capsys.readouterr().out
    assert "encode, " not in out and "| (b)" not in out
    assert re.search(r"\| float32 \| False \| ([\d.]+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", out), out
