"""The nemo benchmarks: the GPU suite says so and exits cleanly without a GPU; the CPU batching bench runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kubespeech.bench.gpu import gpu_available, run_gpu_bench
from kubespeech.bench.nemo_cpu import run_nemo_cpu_bench

KUBESPEECH = str(Path(sys.executable).with_name("kubespeech"))
NO_GPU = "needs an NVIDIA GPU (torch.cuda.is_available() is False)"


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has a GPU: the CPU-only path cannot be seen"
)
def test_gpu_suite_on_a_cpu_only_machine_says_so_and_exits_0(tmp_path: Path) -> None:
    lines: list[str] = []
    assert run_gpu_bench(echo=lines.append) == {
        "skipped": "no NVIDIA GPU (torch.cuda.is_available() is False)"
    }
    assert "unmeasured" in lines[0]
    done = subprocess.run(
        [KUBESPEECH, "bench", "--gpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, KUBESPEECH_LOG_LEVEL="WARNING"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "skipped" in done.stdout and "GPU figures are unmeasured" in done.stdout


def test_cpu_batching_bench_reports_jobs_per_second_per_batch_size() -> None:
    lines: list[str] = []
    result = run_nemo_cpu_bench((1, 4), jobs=12, clip_seconds=1.0, threads=1, echo=lines.append)
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [1, 4]
    assert all(r["direct_jobs_s"] > 0 and r["worker_jobs_s"] > 0 for r in rows)
    assert rows[0]["worker_mean_batch"] == 1.0 and rows[1]["worker_mean_batch"] > 1.0
    assert "worker_jobs_s" in lines[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available()[0], reason=NO_GPU)
def test_gpu_suite_measures_engine_and_direct_nemo(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_gpu_bench(batch_sizes=(1, 8), clip_seconds=2.0, clips_per_size=16, echo=lines.append)
    rows = result["asr"]["rows"]
    assert [r["batch"] for r in rows] == [1, 8]
    assert all(r["engine_rtfx"] > 0 and r["direct_rtfx"] > 0 for r in rows)
    assert result["tts"]["ttfa_ms_p50"] > 0
