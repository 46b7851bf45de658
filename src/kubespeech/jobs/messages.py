"""The contract between the API server and the workers: what a job's meta/payload and result carry per task.

ASR job: payload is 16-bit little-endian mono PCM at ``ASR_SAMPLE_RATE`` (the API decodes and resamples
any input once; workers resample further only if their engine needs another rate); meta holds the
recognition options. Result header: text, language, duration, words, segments, timings.

TTS job: empty payload; meta holds text, voice, speed, language. Result body: 16-bit mono PCM at the
engine's native rate (named in the header); the API resamples and encodes to what the client asked for.
A *streaming* TTS job (meta ``stream`` true) sends its audio chunk by chunk on the job's chunk stream
instead (see ``kubespeech.jobs.protocol``); its result carries only the header (chunks, duration).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kubespeech.engines.base import AsrRequest, AsrResult, Audio, TtsRequest

ASR_SAMPLE_RATE = 16000


def pcm16_from_float(audio: Audio) -> bytes:
    clipped = np.clip(audio, -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def float_from_pcm16(data: bytes) -> Audio:
    if len(data) % 2:
        data = data[:-1]
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def asr_meta(
    *,
    language: str | None = None,
    word_timestamps: bool = False,
    prompt: str | None = None,
    temperature: float = 0.0,
) -> dict[str, Any]:
    return {
        "task": "asr",
        "sample_rate": ASR_SAMPLE_RATE,
        "language": language,
        "word_timestamps": word_timestamps,
        "prompt": prompt,
        "temperature": temperature,
    }


def asr_request_from_job(meta: dict[str, Any], payload: bytes) -> AsrRequest:
    return AsrRequest(
        audio=float_from_pcm16(payload),
        language=meta.get("language"),
        word_timestamps=bool(meta.get("word_timestamps")),
        prompt=meta.get("prompt"),
        temperature=float(meta.get("temperature") or 0.0),
    )


def asr_result_header(result: AsrResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "language": result.language,
        "duration": result.duration,
        "words": [
            {"word": w.word, "start": w.start, "end": w.end, "confidence": w.confidence} for w in result.words
        ],
        "segments": [{"text": s.text, "start": s.start, "end": s.end} for s in result.segments],
    }


def tts_meta(
    *,
    text: str,
    voice: str | None = None,
    speed: float = 1.0,
    language: str | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"task": "tts", "text": text, "voice": voice, "speed": speed, "language": language}
    if stream:
        meta["stream"] = True
    return meta


def tts_request_from_job(meta: dict[str, Any]) -> TtsRequest:
    return TtsRequest(
        text=str(meta.get("text") or ""),
        voice=meta.get("voice"),
        speed=float(meta.get("speed") or 1.0),
        language=meta.get("language"),
    )
