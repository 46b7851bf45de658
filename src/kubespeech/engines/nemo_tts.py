"""NVIDIA NeMo speech synthesis: a spectrogram generator (FastPitch) and a vocoder (HiFi-GAN) from ``.nemo`` files.

A worker micro-batch is synthesized in one pass of each model: token sequences are padded with the
encoder's padding index, FastPitch predicts every item's mel frames at once (per-item speaker and pace),
the padded mel frames are filled with silence and HiFi-GAN vocodes the whole batch; each item's audio is
then cut to its own length (mel frames x hop). ``last_batch_sizes`` records the batch size of each
spectrogram pass. Multi-speaker models expose their speakers as voices. Text is normalized with
``nemo_text_processing`` when it is installed (or by the model's own normalizer when it has one).

NeMo and torch are imported when the engine loads, never when kubespeech is imported.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kubespeech.engines.base import Audio, TtsRequest, TtsResult, VoiceInfo
from kubespeech.engines.nemo_asr import engine_options, gpu_memory, resolve_precision
from kubespeech.errors import EmptyInput, EngineError, InvalidInput, TextTooLong, UnknownVoice

log = logging.getLogger(__name__)

# Log-mel value of silence in NeMo's TTS recipes (log of the 1e-5 zero guard): what padded frames are set to.
_SILENT_MEL = -11.52
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Split on sentence punctuation and newlines; overlong sentences are cut at spaces near ``max_chars``."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        while len(sentence) > max_chars:
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return pieces


def _load_normalizer(language: str) -> Any:
    """nemo_text_processing's rule-based normalizer ("$5" -> "five dollars"), or None when not installed."""
    try:
        from nemo_text_processing.text_normalization.normalize import Normalizer
    except ImportError:
        return None
    try:
        return Normalizer(input_case="cased", lang=language.split("-")[0])
    except Exception as exc:  # grammars missing for the language, or pynini problems
        log.warning("text normalization unavailable", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
        return None


class NemoTtsEngine:
    """A NeMo spectrogram generator + vocoder pair behind the TtsEngine protocol.

    ``model_path`` is the spectrogram generator (e.g. FastPitch) or a directory holding it and its vocoder.
    Options (``KUBESPEECH_WORKER_ENGINE_OPTIONS``): ``vocoder_path`` (e.g. HiFi-GAN; looked up in the model
    directory when unset), ``voices`` (speaker name -> speaker index, or a list of names
    in index order), ``default_voice``, ``language``, ``precision`` (auto|fp32|fp16|bf16; autocast on CUDA),
    ``normalize_text`` (default true), ``max_text_chars``, ``output_sample_rate`` (resample the output),
    ``stream_max_chars`` and ``stream_batch`` (sentence chunks per batch after the first), ``warmup``,
    ``cpu_threads`` (torch threads on CPU). camelCase keys are accepted.
    """

    name = "nemo"

    def __init__(self, model_path: str | None = None, device: str = "cpu", **options: Any) -> None:
        if not model_path:
            raise InvalidInput(
                "the nemo TTS engine needs model_path: a spectrogram generator .nemo (e.g. FastPitch) or a"
                " directory holding it and its vocoder"
            )
        self.model_path = str(model_path)
        self.device = device or "cpu"
        self.precision = "fp32"
        self._configure(**engine_options(self._configure, options, "nemo TTS"))
        self.sample_rate = self.output_sample_rate or 22050
        self.native_sample_rate = 22050
        self.spec_gen: Any = None
        self.vocoder: Any = None
        self.normalizer: Any = None
        self.hop_length = 256
        self.speakers: dict[str, int] = {}
        self.load_seconds = 0.0
        self.last_batch_sizes: list[int] = []
        self._lock = threading.Lock()

    def _configure(
        self,
        *,
        vocoder_path: str | None = None,
        voices: dict[str, int] | list[str] | None = None,
        default_voice: str | None = None,
        language: str = "en-US",
        precision: str = "auto",
        normalize_text: bool = True,
        max_text_chars: int = 5000,
        output_sample_rate: int | None = None,
        stream_max_chars: int = 300,
        stream_batch: int = 4,
        warmup: bool = True,
        cpu_threads: int | None = None,
    ) -> None:
        self.vocoder_path = str(vocoder_path) if vocoder_path else None
        self.voice_option = voices
        self.default_voice = default_voice
        self.language = language
        self.precision_option = precision
        self.normalize_text = bool(normalize_text)
        self.max_text_chars = int(max_text_chars)
        self.output_sample_rate = int(output_sample_rate) if output_sample_rate else None
        self.stream_max_chars = int(stream_max_chars)
        self.stream_batch = max(int(stream_batch), 1)
        self.warmup = bool(warmup)
        self.cpu_threads = int(cpu_threads) if cpu_threads else None

    # ----- load -----------------------------------------------------------------------------------

    def load(self) -> None:
        if self.spec_gen is not None:
            return
        from kubespeech.models.nemo_files import resolve_model_file

        # model_path may be a cache directory holding both files; the vocoder then comes from it too.
        spec_file = resolve_model_file(self.model_path, vocoder=False)
        vocoder_file = resolve_model_file(self.vocoder_path or self.model_path, vocoder=True)
        self.model_path, self.vocoder_path = str(spec_file), str(vocoder_file)
        started = time.perf_counter()
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device '{self.device}' requested but torch sees no CUDA GPU")
        self.precision = resolve_precision(self.precision_option, self.device)
        if self.cpu_threads and not self.device.startswith("cuda"):
            torch.set_num_threads(self.cpu_threads)  # process-wide: a worker process serves one engine
        from nemo.collections.tts.models.base import SpectrogramGenerator, Vocoder

        device = torch.device(self.device)
        self.spec_gen = SpectrogramGenerator.restore_from(self.model_path, map_location=device).eval()
        # strict=False: vocoders are often saved without their (training-only) discriminators.
        self.vocoder = Vocoder.restore_from(self.vocoder_path, map_location=device, strict=False).eval()
        vcfg = self.vocoder.cfg
        self.native_sample_rate = int(
            getattr(self.vocoder, "sample_rate", 0) or vcfg.preprocessor.get("sample_rate", 22050)
        )
        self.sample_rate = self.output_sample_rate or self.native_sample_rate
        self.hop_length = int(vcfg.preprocessor.get("n_window_stride", 256) or 256)
        self.speakers = self._speaker_map()
        if self.default_voice is not None and self.default_voice not in self.speakers:
            raise InvalidInput(f"default_voice '{self.default_voice}' is not one of {sorted(self.speakers)}")
        if self.normalize_text and getattr(self.spec_gen, "normalizer", None) is None:
            self.normalizer = _load_normalizer(self.language)
        if self.warmup:
            self.synthesize_batch([TtsRequest(text="Warm up.")])
        self.load_seconds = time.perf_counter() - started
        log.info(
            "nemo TTS models loaded",
            extra={
                "model": Path(self.model_path).name,
                "vocoder": Path(self.vocoder_path).name,
                "device": self.device,
                "precision": self.precision,
                "voices": len(self.speakers),
                "normalizer": self.normalizer is not None,
                "seconds": round(self.load_seconds, 2),
            },
        )

    def _speaker_map(self) -> dict[str, int]:
        n_speakers = int(self.spec_gen.cfg.get("n_speakers", 1) or 1)
        option = self.voice_option
        if isinstance(option, dict):
            mapping = {str(k): int(v) for k, v in option.items()}
        elif isinstance(option, list):
            mapping = {str(name): i for i, name in enumerate(option)}
        elif n_speakers > 1:
            mapping = {f"speaker-{i}": i for i in range(n_speakers)}
        else:
            mapping = {Path(self.model_path).stem: 0}
        bad = {k: v for k, v in mapping.items() if not 0 <= v < max(n_speakers, 1)}
        if bad:
            raise InvalidInput(f"voices {bad} point at speakers outside 0..{n_speakers - 1}")
        return mapping

    # ----- synthesis --------------------------------------------------------------------------------

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(id=name, name=name, language=self.language) for name in self.speakers]

    def _speaker_index(self, voice: str | None) -> int:
        if voice is None or voice == "" or voice == "default":
            name = self.default_voice or next(iter(self.speakers))
            return self.speakers[name]
        if voice not in self.speakers:
            raise UnknownVoice(f"voice '{voice}' not found; available: {', '.join(self.speakers)}")
        return self.speakers[voice]

    def _tokens(self, request: TtsRequest) -> Any:
        text = request.text.strip()
        if not text:
            raise EmptyInput("text is empty")
        if len(text) > self.max_text_chars:
            raise TextTooLong(f"text of {len(text)} characters exceeds the limit of {self.max_text_chars}")
        if not 0.25 <= request.speed <= 4.0:
            raise InvalidInput(f"speed {request.speed} is outside 0.25-4.0")
        if self.normalizer is not None:
            text = self.normalizer.normalize(text, punct_post_process=True)
        tokens = self.spec_gen.parse(text, normalize=self.normalize_text)[0]
        if tokens.numel() == 0:
            raise EmptyInput("text has nothing this model can pronounce")
        return tokens

    def autocast(self) -> Any:
        if not self.device.startswith("cuda") or self.precision == "fp32":
            return contextlib.nullcontext()
        import torch

        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _spectrograms(self, tokens: list[Any], speakers: list[int], paces: list[float]) -> tuple[Any, Any]:
        """Mel spectrograms [B, n_mels, T] and their frame counts [B] for a batch of token sequences."""
        import torch

        device = self.spec_gen.device
        fastpitch = getattr(self.spec_gen, "fastpitch", None)
        multi_speaker = int(self.spec_gen.cfg.get("n_speakers", 1) or 1) > 1
        if fastpitch is None:
            # Other generators (e.g. Tacotron 2) have no batched-with-lengths API: one call per item.
            specs = [
                self.spec_gen.generate_spectrogram(
                    tokens=t.unsqueeze(0).to(device), **({"speaker": s} if multi_speaker else {})
                )[0]
                for t, s in zip(tokens, speakers, strict=True)
            ]
            lens = torch.tensor([s.shape[-1] for s in specs])
            batch = torch.full((len(specs), specs[0].shape[0], int(lens.max())), _SILENT_MEL, device=device)
            for i, spec in enumerate(specs):
                batch[i, :, : spec.shape[-1]] = spec
            return batch, lens
        pad = int(fastpitch.encoder.padding_idx)
        longest = max(int(t.numel()) for t in tokens)
        text = torch.full((len(tokens), longest), pad, dtype=torch.long, device=device)
        for i, t in enumerate(tokens):
            text[i, : t.numel()] = t
        speaker = torch.tensor(speakers, dtype=torch.long, device=device) if multi_speaker else None
        pace = torch.tensor(paces, dtype=torch.float32, device=device).unsqueeze(1)
        spect, lens, *_ = fastpitch.infer(
            text=text, pitch=torch.zeros_like(text, dtype=torch.float32), speaker=speaker, pace=pace
        )
        return spect, lens

    def _run(self, tokens: list[Any], speakers: list[int], paces: list[float]) -> list[Audio]:
        import torch

        with self._lock, torch.inference_mode(), self.autocast():
            spect, lens = self._spectrograms(tokens, speakers, paces)
            self.last_batch_sizes.append(len(tokens))
            frames = torch.arange(spect.shape[-1], device=spect.device)
            spect = spect.float().masked_fill(frames[None, None, :] >= lens[:, None, None], _SILENT_MEL)
            audio = self.vocoder.convert_spectrogram_to_audio(spec=spect)
        audio_np = audio.float().cpu().numpy()
        out = []
        for i, n_frames in enumerate(lens.cpu().tolist()):
            clip = np.clip(audio_np[i, : int(n_frames) * self.hop_length], -1.0, 1.0).astype(np.float32)
            if self.output_sample_rate and self.output_sample_rate != self.native_sample_rate:
                import soxr

                clip = np.asarray(
                    soxr.resample(clip, self.native_sample_rate, self.output_sample_rate), np.float32
                )
            out.append(clip)
        return out

    def synthesize_batch(self, requests: Sequence[TtsRequest]) -> list[TtsResult | Exception]:
        if self.spec_gen is None:
            raise EngineError("the nemo TTS engine is not loaded")
        self.last_batch_sizes = []
        results: list[TtsResult | Exception | None] = [None] * len(requests)
        ok: list[int] = []
        tokens, speakers, paces = [], [], []
        for i, request in enumerate(requests):
            try:
                speaker = self._speaker_index(request.voice)
                tokens.append(self._tokens(request))
                speakers.append(speaker)
                paces.append(float(request.speed))
                ok.append(i)
            except Exception as exc:
                results[i] = exc
        if ok:
            try:
                clips = self._run(tokens, speakers, paces)
                for i, clip in zip(ok, clips, strict=True):
                    results[i] = TtsResult(audio=clip, sample_rate=self.sample_rate)
            except Exception as exc:
                if len(ok) == 1:
                    results[ok[0]] = exc
                else:
                    log.warning(
                        "batched synthesis failed; retrying items one by one", extra={"error": f"{exc}"[:300]}
                    )
                    for i, tok, spk, pace in zip(ok, tokens, speakers, paces, strict=True):
                        try:
                            results[i] = TtsResult(
                                audio=self._run([tok], [spk], [pace])[0], sample_rate=self.sample_rate
                            )
                        except Exception as item_exc:
                            results[i] = item_exc
        return [r if r is not None else EngineError("no result") for r in results]

    def synthesize_stream(self, request: TtsRequest) -> Iterator[Audio]:
        """Yield one chunk per sentence: the first sentence alone (first audio soon), then the rest in batches."""
        sentences = split_sentences(request.text, self.stream_max_chars)
        if not sentences:
            raise EmptyInput("text is empty")
        groups = [sentences[:1]] + [
            sentences[i : i + self.stream_batch] for i in range(1, len(sentences), self.stream_batch)
        ]
        for group in groups:
            results = self.synthesize_batch(
                [
                    TtsRequest(text=s, voice=request.voice, speed=request.speed, language=request.language)
                    for s in group
                ]
            )
            for result in results:
                if isinstance(result, Exception):
                    if isinstance(result, EmptyInput):  # a chunk of pure punctuation: nothing to say
                        continue
                    raise result
                yield result.audio

    # ----- description ------------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {
            "engine": self.name,
            "model": Path(self.model_path).stem,
            "model_path": self.model_path,
            "vocoder": Path(self.vocoder_path).stem if self.vocoder_path else None,
            "device": self.device,
            "precision": self.precision,
            "sample_rate": self.sample_rate,
            "languages": [self.language],
            "voices": [{"id": v.id, "name": v.name, "language": v.language} for v in self.voices()],
            "text_normalization": self.normalizer is not None
            or getattr(self.spec_gen, "normalizer", None) is not None,
            "load_seconds": round(self.load_seconds, 3),
        }
        memory = gpu_memory(self.device)
        if memory is not None:
            info["gpu_memory"] = memory
        return info
