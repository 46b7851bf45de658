"""Result cache benchmark: TTS and STT p50 for a cache hit vs a miss on the CPU engines (Piper, faster-whisper),
and requests per second at 8 clients on a hit-heavy TTS mix (90 % repeats) with the cache vs without it.

Everything runs on one stack, measured side by side: misses and hits alternate request by request, and the
throughput windows alternate between the two modes (``Cache-Control: no-store`` turns the cache off for a
request: no lookup, nothing stored), so drift of the machine affects both alike.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from typing import Any

import numpy as np

from kubespeech.bench.stack import BenchStack, run_load, wav_bytes

TTS_MODEL, ASR_MODEL = "piper-joe", "whisper-tiny-en"
# What voice applications repeat: prompts, greetings, confirmations.
PROMPTS = [
    "Thank you for calling. Your call is important to us.",
    "Please hold while we connect you to an agent.",
    "Press one for sales, or two for support.",
    "Your appointment is confirmed for tomorrow morning.",
    "Sorry, I did not catch that. Could you say it again?",
    "Your order has shipped and will arrive on Friday.",
    "Please enter your account number followed by the pound key.",
    "All of our agents are busy. Please stay on the line.",
    "Goodbye, and have a wonderful day.",
    "One moment while I look that up for you.",
]


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


async def cache_bench(
    seconds: float = 5.0, rounds: int = 3, clients: int = 8, samples: int = 15
) -> dict[str, Any]:
    import aiohttp

    stack = BenchStack(
        workers=[
            {"task": "tts", "model": TTS_MODEL, "engine": "piper", "max_batch_size": 8},
            {"task": "asr", "model": ASR_MODEL, "engine": "whisper", "max_batch_size": 8},
        ],
        models=[
            {"name": TTS_MODEL, "task": "tts", "default": True, "aliases": [], "voices": ["joe"]},
            {"name": ASR_MODEL, "task": "asr", "default": True, "aliases": []},
        ],
        # Both caches on; the STT cache is opt-in and encrypted with a key from a Secret (a random one here).
        spec={"cache": {"tts": {"enabled": True}, "asr": {
            "enabled": True, "encryptionKeySecretRef": {"name": "bench-cache-key", "key": "key"}}}},
    )  # fmt: skip
    stack.start()
    unique = itertools.count(100_001)
    auth = {"Authorization": f"Bearer {stack.key}"}
    no_store = {**auth, "Cache-Control": "no-store"}
    try:
        async with aiohttp.ClientSession(base_url=stack.url) as session:

            async def tts(text: str, headers: dict[str, str]) -> tuple[bool, str, bytes]:
                async with session.post("/waves/v1/tts", json={"text": text}, headers=headers) as r:
                    body = await r.read()
                    return r.status == 200, r.headers.get("X-Cache", ""), body

            async def stt(audio: bytes) -> tuple[bool, str]:
                headers = {**auth, "Content-Type": "audio/wav"}
                async with session.post("/waves/v1/stt/?language=en", data=audio, headers=headers) as r:
                    await r.read()
                    return r.status == 200, r.headers.get("X-Cache", "")

            async def timed(call: Any, *args: Any) -> tuple[float, Any]:
                started = time.perf_counter()
                out = await call(*args)
                return (time.perf_counter() - started) * 1000, out

            # -- TTS latency: a repeated prompt (hit) and fresh texts of the same shape (miss), interleaved.
            hit_text = "Your ticket number is 100000."
            ok, _, _ = await tts(hit_text, auth)
            assert ok, f"TTS failed; see {stack.dir / 'logs'}"
            tts_ms: dict[str, list[float]] = {"hit": [], "miss": []}
            for _ in range(samples + 1):
                took_miss, (_, miss_state, _) = await timed(
                    tts, f"Your ticket number is {next(unique)}.", auth
                )
                took_hit, (_, hit_state, _) = await timed(tts, hit_text, auth)
                assert (miss_state, hit_state) == ("miss", "hit"), (miss_state, hit_state)
                tts_ms["miss"].append(took_miss)
                tts_ms["hit"].append(took_hit)

            # -- STT latency: the same 2 s utterance (hit) vs the utterance with one sample changed (miss).
            _, _, speech = await tts("Please call me back this afternoon.", no_store)
            base = np.frombuffer(speech[44:], dtype="<i2").astype(np.float32) / 32768
            rate = int.from_bytes(speech[24:28], "little")
            import soxr

            audio16 = np.asarray(soxr.resample(base, rate, 16000), dtype=np.float32)
            audio16 = np.pad(audio16, (0, max(0, 32000 - len(audio16))))[:32000]
            same = wav_bytes(audio16, 16000)
            assert (await stt(same))[0], f"STT failed; see {stack.dir / 'logs'}"
            stt_ms: dict[str, list[float]] = {"hit": [], "miss": []}
            for i in range(samples // 2 + 1):
                varied = audio16.copy()
                varied[-1 - i] = 0.001 * (i + 1)  # inaudible, but other audio: another key
                took_miss, (_, miss_state) = await timed(stt, wav_bytes(varied, 16000))
                took_hit, (_, hit_state) = await timed(stt, same)
                assert (miss_state, hit_state) == ("miss", "hit"), (miss_state, hit_state)
                stt_ms["miss"].append(took_miss)
                stt_ms["hit"].append(took_hit)

            # -- Throughput at `clients` clients, 90 % repeats: with the cache vs without (no-store).
            for prompt in PROMPTS:
                await tts(prompt, auth)
            rng = random.Random(14)

            def mix(headers: dict[str, str]) -> Any:
                async def one() -> bool:
                    text = rng.choice(PROMPTS) if rng.random() < 0.9 else f"Your code is {next(unique)}."
                    ok, _, _ = await tts(text, headers)
                    return ok

                return one

            windows: dict[str, list[dict[str, Any]]] = {"cache": [], "no cache": []}
            for _ in range(rounds):
                for mode, headers in (("cache", auth), ("no cache", no_store)):
                    res = await run_load(
                        f"tts-90%-repeats-{mode}", mix(headers), clients, seconds, warmup_s=1.0
                    )
                    windows[mode].append(res.row())
    finally:
        stack.stop()
    latency = [
        {"task": task, "case": case, "samples": len(ms[case][1:]), "p50_ms": _p50(ms[case][1:])}
        for task, ms in (("tts", tts_ms), ("stt", stt_ms))
        for case in ("miss", "hit")
    ]
    throughput = [
        {
            "mode": mode,
            "clients": clients,
            "windows": len(rows),
            "rps_median": round(statistics.median(r["rps"] for r in rows), 1),
            "p50_ms_median": round(statistics.median(r["p50_ms"] for r in rows), 1),
            "errors": sum(r["errors"] for r in rows),
        }
        for mode, rows in windows.items()
    ]
    speedup = throughput[0]["rps_median"] / throughput[1]["rps_median"] if throughput[1]["rps_median"] else 0
    return {
        "latency": latency,
        "throughput": throughput,
        "throughput_speedup": round(speedup, 1),
        "windows": windows,
        "window_seconds": seconds,
    }
