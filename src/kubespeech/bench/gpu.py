"""``kubespeech bench --gpu``: the nemo engines on an NVIDIA GPU, next to NeMo called directly in the same run.

ASR: RTFx (seconds of audio per second of wall time) of the nemo engine at batch 1/8/32/128, and of the same
model object through NeMo's own ``transcribe()`` at the same batch size, on the same clips. TTS: real-time
factor and time to first audio of the nemo TTS engine. Models come from ``--asr-model`` / ``--tts-model``
style arguments or ``KUBESPEECH_BENCH_ASR_MODEL`` / ``KUBESPEECH_BENCH_TTS_MODEL`` (a ``.nemo`` file or a
model-cache directory, e.g. ``kubespeech model fetch hf://nvidia/parakeet-tdt-0.6b-v2 --to DIR``); without
one a random-weight FastConformer-CTC of realistic size (~115M parameters) stands in, and the results say so.

On a machine without a CUDA GPU it says so and returns without measuring anything.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubespeech.bench.report import table
from kubespeech.engines.base import AsrRequest, TtsRequest

Echo = Callable[[str], None]

TTS_TEXT = (
    "The quick brown fox jumps over the lazy dog. Speech models served on graphics processors answer in a "
    "fraction of real time. Batching many requests together keeps the device busy."
)


def echo_stdout(line: str) -> None:
    import typer

    typer.echo(line)


def gpu_available() -> tuple[bool, str]:
    """Whether torch sees a CUDA GPU, and the GPU's name (or why not)."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no NVIDIA GPU (torch.cuda.is_available() is False)"
    return True, str(torch.cuda.get_device_name(0))


def speech_clips(count: int, seconds: float, sample_rate: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """``count`` clips of about ``seconds``: piper speech when the cpu extra is installed, else shaped noise.

    Lengths vary by +-10 % so padding costs what it costs in real traffic.
    """
    rng = np.random.default_rng(seed)
    base: list[np.ndarray] = []
    try:
        import soxr

        from kubespeech.engines.registry import EngineSpec, load_engine

        piper = load_engine(EngineSpec(task="tts", engine="piper"))
        piper.load()
        result = piper.synthesize_batch([TtsRequest(text=TTS_TEXT)])[0]
        base = [np.asarray(soxr.resample(result.audio, result.sample_rate, sample_rate), dtype=np.float32)]
    except Exception:
        base = [(rng.standard_normal(int(30 * sample_rate)) * 0.05).astype(np.float32)]
    source = np.concatenate(base * max(1, int(np.ceil(seconds * 2 * sample_rate / base[0].size))))
    clips = []
    for _ in range(count):
        n = int(seconds * sample_rate * rng.uniform(0.9, 1.1))
        start = int(rng.integers(0, max(source.size - n, 1)))
        clips.append(source[start : start + n].copy())
    return clips


def measure_engine(engine: Any, clips: Sequence[np.ndarray], batch_size: int) -> dict[str, float]:
    """Throughput of ``engine.transcribe_batch`` over ``clips`` in micro-batches of ``batch_size``."""
    rate = engine.sample_rate
    engine.transcribe_batch([AsrRequest(audio=c) for c in clips[:batch_size]])  # warm-up at this shape
    started = time.perf_counter()
    passes = 0
    for i in range(0, len(clips), batch_size):
        engine.transcribe_batch([AsrRequest(audio=c) for c in clips[i : i + batch_size]])
        passes += len(engine.last_batch_sizes)
    wall = time.perf_counter() - started
    audio = sum(c.size for c in clips) / rate
    return {"rtfx": audio / wall, "items_per_s": len(clips) / wall, "wall_s": wall, "forward_passes": passes}


def measure_direct(engine: Any, clips: Sequence[np.ndarray], batch_size: int) -> dict[str, float]:
    """The same model object through NeMo's ``transcribe()`` with the same batch size and precision."""
    rate = engine.sample_rate
    model = engine.model
    with engine.autocast():
        model.transcribe(list(clips[:batch_size]), batch_size=batch_size, num_workers=0, verbose=False)
        started = time.perf_counter()
        model.transcribe(list(clips), batch_size=batch_size, num_workers=0, verbose=False)
        wall = time.perf_counter() - started
    audio = sum(c.size for c in clips) / rate
    return {"rtfx": audio / wall, "items_per_s": len(clips) / wall, "wall_s": wall}


def _synthetic_asr_model(directory: Path) -> Path:
    from kubespeech.bench.nemo_tiny import build_asr

    path = directory / "fastconformer-ctc-synthetic.nemo"
    build_asr("fastconformer").save_to(str(path))
    return path


def bench_asr(
    model_path: str | Path,
    *,
    device: str,
    batch_sizes: Sequence[int],
    clip_seconds: float,
    clips_per_size: int,
    precision: str = "auto",
    engine_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    from kubespeech.engines.nemo_asr import NemoAsrEngine

    engine = NemoAsrEngine(
        model_path=str(model_path), device=device, precision=precision, **(engine_options or {})
    )
    engine.load()
    rows = []
    for size in batch_sizes:
        clips = speech_clips(max(clips_per_size, size * 2), clip_seconds, engine.sample_rate, seed=size)
        ours = measure_engine(engine, clips, size)
        direct = measure_direct(engine, clips, size)
        rows.append(
            {
                "batch": size,
                "clips": len(clips),
                "engine_rtfx": round(ours["rtfx"], 1),
                "direct_rtfx": round(direct["rtfx"], 1),
                "engine/direct": round(ours["rtfx"] / direct["rtfx"], 3),
                "engine_items_s": round(ours["items_per_s"], 1),
                "forward_passes": int(ours["forward_passes"]),
            }
        )
    base = rows[0]["engine_rtfx"] or 1.0
    for row in rows:
        row["speedup_vs_b1"] = round(row["engine_rtfx"] / base, 2)
    return {"model": engine.describe(), "clip_seconds": clip_seconds, "rows": rows}


def bench_tts(
    model_path: str | Path, *, device: str, precision: str = "auto", repeats: int = 5
) -> dict[str, Any]:
    from kubespeech.engines.nemo_tts import NemoTtsEngine

    engine = NemoTtsEngine(model_path=str(model_path), device=device, precision=precision)
    engine.load()
    rows = []
    for size in (1, 8):
        requests = [TtsRequest(text=TTS_TEXT)] * size
        engine.synthesize_batch(requests)
        walls, audio_s = [], 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            results = engine.synthesize_batch(requests)
            walls.append(time.perf_counter() - started)
            audio_s = sum(len(r.audio) / r.sample_rate for r in results if not isinstance(r, Exception))
        wall = statistics.median(walls)
        rows.append(
            {
                "batch": size,
                "audio_s": round(audio_s, 2),
                "wall_s": round(wall, 4),
                "rtf": round(wall / audio_s, 4),
            }
        )
    ttfa = []
    for _ in range(repeats):
        started = time.perf_counter()
        next(iter(engine.synthesize_stream(TtsRequest(text=TTS_TEXT))))
        ttfa.append((time.perf_counter() - started) * 1000)
    return {"model": engine.describe(), "rows": rows, "ttfa_ms_p50": round(statistics.median(ttfa), 1)}


def run_gpu_bench(
    asr_model: str | None = None,
    tts_model: str | None = None,
    *,
    device: str = "cuda",
    batch_sizes: Sequence[int] = (1, 8, 32, 128),
    clip_seconds: float = 5.0,
    clips_per_size: int = 256,
    precision: str = "auto",
    echo: Echo | None = echo_stdout,
) -> dict[str, Any]:
    """Run the GPU suite and print its tables; on a machine without a CUDA GPU, say so and return."""
    say = echo or (lambda _line: None)
    ok, gpu = gpu_available()
    if not ok:
        say(f"\n== NeMo GPU suite: skipped, {gpu}; GPU figures are unmeasured on this machine ==")
        return {"skipped": gpu}
    asr_model = asr_model or os.environ.get("KUBESPEECH_BENCH_ASR_MODEL")
    tts_model = tts_model or os.environ.get("KUBESPEECH_BENCH_TTS_MODEL")
    result: dict[str, Any] = {"gpu": gpu, "device": device}
    with tempfile.TemporaryDirectory(prefix="ks-gpu-bench-") as tmp:
        synthetic = asr_model is None
        path = Path(asr_model) if asr_model else _synthetic_asr_model(Path(tmp))
        asr = bench_asr(
            path,
            device=device,
            batch_sizes=batch_sizes,
            clip_seconds=clip_seconds,
            clips_per_size=clips_per_size,
            precision=precision,
        )
        asr["synthetic_model"] = synthetic
        result["asr"] = asr
        label = "random-weight FastConformer-CTC (~115M)" if synthetic else str(asr["model"]["model"])
        say(f"\n== NeMo ASR on {gpu}: {label}, {asr['model']['precision']}, ~{clip_seconds:.0f} s clips ==")
        say(table(asr["rows"]))
        if tts_model is None:
            from kubespeech.bench.nemo_tiny import save_tts

            tts_model = str(save_tts(Path(tmp) / "tts")[0].parent)
            result["tts_synthetic_model"] = True
        tts = bench_tts(tts_model, device=device, precision=precision)
        result["tts"] = tts
        say(f"\n== NeMo TTS on {gpu}: {tts['model']['model']} + {tts['model']['vocoder']} ==")
        say(table(tts["rows"]))
        say(f"time to first audio (stream, p50): {tts['ttfa_ms_p50']} ms")
    return result
