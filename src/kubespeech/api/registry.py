"""What the API serves: models (from the operator's models file and live workers' descriptions), aliases,
voices and live-worker counts, refreshed in the background so a request never waits on a lookup.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from redis.asyncio import Redis

from kubespeech.api.models_file import load_models_file
from kubespeech.api.settings import ApiSettings
from kubespeech.errors import InvalidInput, NoWorkers, UnknownModel, UnknownVoice
from kubespeech.jobs import Keys

log = logging.getLogger(__name__)

TASKS = ("asr", "tts")


@dataclass(slots=True)
class Voice:
    id: str
    name: str
    language: str | None = None
    gender: str | None = None


@dataclass(slots=True)
class ModelInfo:
    """One servable model (= one queue name = one worker pool's model name)."""

    name: str
    task: str
    aliases: list[str] = field(default_factory=list)
    voices: list[Voice] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    engine: str | None = None
    sample_rate: int | None = None
    default: bool = False
    # How long a request is held while this model's pool scales from zero (None: the API's own setting).
    cold_start_wait_s: float | None = None
    # The model revision its workers publish (a fingerprint of model files, options and release); the
    # result cache is keyed by it, and not used while it is unknown.
    revision: str | None = None
    configured: bool = False  # named in the operator's models file (its task is enabled)
    published: bool = False  # described by a worker in Redis


def _wait(raw: Any) -> float | None:
    """A cold-start wait in seconds from the models file; anything else reads as unset (the API default)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not 0 <= raw <= 600:
        return None
    return float(raw)


def _voices(raw: Any) -> list[Voice]:
    out: list[Voice] = []
    for item in raw or []:
        if isinstance(item, str) and item:
            out.append(Voice(id=item, name=item))
        elif isinstance(item, dict) and item.get("id"):
            out.append(
                Voice(
                    id=str(item["id"]),
                    name=str(item.get("name") or item["id"]),
                    language=item.get("language"),
                    gender=item.get("gender"),
                )
            )
    return out


class ModelRegistry:
    """Resolves client model/voice names; all lookups are in-memory (``refresh`` runs in the background)."""

    def __init__(self, settings: ApiSettings, redis: Redis | None, keys: Keys) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self._file_models: dict[str, ModelInfo] = {}
        self._file_mtime: float | None = None
        self._published: dict[str, dict[str, Any]] = {}
        self.live: dict[str, int] = {}
        self.models: dict[str, ModelInfo] = {}
        self._index: dict[str, str] = {}
        self.defaults: dict[str, str | None] = {"asr": None, "tts": None}
        self.redis_ok = False
        self.last_refresh = 0.0
        self.load_file()
        self._rebuild()

    # -- loading -----------------------------------------------------------------------------------

    def load_file(self) -> bool:
        """(Re)read the models file when it changed; True when something was loaded."""
        path: Path | None = self.settings.models_file
        if path is None:
            return False
        try:
            mtime = path.stat().st_mtime
        except OSError:
            if self._file_mtime is not None:
                log.warning("models file disappeared; keeping the last list", extra={"path": str(path)})
            return False
        if mtime == self._file_mtime:
            return False
        try:
            models: dict[str, ModelInfo] = {}
            for item in load_models_file(path.read_bytes()):
                models[item.name] = ModelInfo(
                    name=item.name,
                    task=item.task,
                    aliases=list(item.aliases),
                    voices=_voices([v if isinstance(v, str) else v.model_dump() for v in item.voices]),
                    default=item.default,
                    cold_start_wait_s=item.cold_start_wait_s,
                    configured=True,
                )
        except (ValueError, OSError) as exc:
            log.error(
                "models file is invalid; keeping the last list", extra={"path": str(path), "error": str(exc)}
            )
            self._file_mtime = mtime
            return False
        self._file_models, self._file_mtime = models, mtime
        return True

    async def refresh(self) -> None:
        """One background round: models file, worker descriptions and live-worker counts (one pipeline)."""
        self.load_file()
        if self.redis is None:
            self._rebuild()
            return
        try:
            raw = await self.redis.hgetall(self.keys.models)
            published: dict[str, dict[str, Any]] = {}
            for k, v in raw.items():
                try:
                    desc = orjson.loads(v)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(desc, dict) and desc.get("task") in TASKS:
                    published[k.decode() if isinstance(k, bytes) else str(k)] = desc
            names = sorted(set(published) | set(self._file_models))
            now_ms = time.time() * 1000
            ttl_ms = self.settings.queue.worker_ttl_s * 1000
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.zcount(self.keys.workers(name), now_ms - ttl_ms, "+inf")
                counts = await pipe.execute()
            self._published = published
            self.live = {n: int(c) for n, c in zip(names, counts, strict=True)}
            self.redis_ok = True
        except Exception as exc:  # Redis down: keep serving from the last known state, report not-ready
            if self.redis_ok:
                log.warning("registry refresh failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self.redis_ok = False
        self._rebuild()
        self.last_refresh = time.monotonic()

    def _rebuild(self) -> None:
        models: dict[str, ModelInfo] = {}
        for name, info in self._file_models.items():
            models[name] = ModelInfo(
                name=info.name,
                task=info.task,
                aliases=list(info.aliases),
                voices=list(info.voices),
                languages=list(info.languages),
                default=info.default,
                cold_start_wait_s=info.cold_start_wait_s,
                configured=True,
            )
        # With an operator-written models file, it alone says what is served (a shared Redis may hold
        # other stacks' or retired pools' descriptions); without one, every publishing pool is served.
        only_listed = self.settings.models_file is not None
        for name, desc in self._published.items():
            m = models.get(name)
            if m is None:
                if only_listed:
                    continue
                m = models[name] = ModelInfo(name=name, task=str(desc["task"]))
            elif m.task != desc["task"]:
                continue  # the operator's file wins over a mislabelled worker
            m.published = True
            m.engine = desc.get("engine")
            revision = desc.get("revision")
            m.revision = str(revision) if isinstance(revision, str) and revision else None
            rate = desc.get("sample_rate")
            m.sample_rate = int(rate) if isinstance(rate, int | float) and rate > 0 else None
            worker_voices = _voices(desc.get("voices"))
            if worker_voices:
                # Workers know their voices' details; keep the operator's ordering when it named some.
                by_id = {v.id: v for v in worker_voices}
                if m.voices:
                    m.voices = [by_id.get(v.id, v) for v in m.voices] + [
                        v for v in worker_voices if v.id not in {x.id for x in m.voices}
                    ]
                else:
                    m.voices = worker_voices
            langs = desc.get("languages")
            if isinstance(langs, list) and not m.languages:
                m.languages = [str(x) for x in langs]
        aliases = self.settings.aliases
        defaults: dict[str, str | None] = {}
        for task, wanted in (("asr", aliases.default_asr_model), ("tts", aliases.default_tts_model)):
            candidates = sorted((m for m in models.values() if m.task == task), key=lambda m: m.name)
            chosen = None
            if wanted and wanted in models and models[wanted].task == task:
                chosen = wanted
            else:
                chosen = next((m.name for m in candidates if m.default), None) or next(
                    (m.name for m in candidates if m.configured), None
                )
                if chosen is None and candidates:
                    chosen = candidates[0].name
            defaults[task] = chosen
            if chosen:
                models[chosen].default = True
        index: dict[str, str] = {}
        for task, names in (("asr", aliases.asr), ("tts", aliases.tts)):
            target = defaults.get(task)
            if target:
                for alias in names:
                    index[alias] = target
        for m in models.values():
            for alias in m.aliases:
                index[alias] = m.name
        for name in models:
            index[name] = name
        self.models, self._index, self.defaults = models, index, defaults

    # -- lookups -----------------------------------------------------------------------------------

    def enabled_tasks(self) -> list[str]:
        configured = {m.task for m in self.models.values() if m.configured}
        if configured:
            return sorted(configured)
        return sorted({m.task for m in self.models.values()})

    def of_task(self, task: str | None = None) -> list[ModelInfo]:
        return [
            m for m in sorted(self.models.values(), key=lambda m: m.name) if task is None or m.task == task
        ]

    def aliases_of(self, model: ModelInfo) -> list[str]:
        return sorted(
            alias for alias, target in self._index.items() if target == model.name and alias != model.name
        )

    def resolve(self, name: str | None, task: str) -> ModelInfo:
        """The model a client name refers to; no name means the task's default."""
        if not name:
            target = self.defaults.get(task)
            if target is None:
                raise NoWorkers(
                    f"no {task.upper()} model is deployed yet",
                    retry_after=float(self.settings.limits.retry_after_s),
                )
            return self.models[target]
        target = self._index.get(name) or self._index.get(name.lower())
        if target is None:
            if name in self.settings.aliases.asr or name in self.settings.aliases.tts:
                raise NoWorkers(
                    f"no {task.upper()} model is deployed yet for '{name}'",
                    retry_after=float(self.settings.limits.retry_after_s),
                )
            known = ", ".join(m.name for m in self.of_task(task)) or "none"
            raise UnknownModel(
                f"model '{name}' does not exist; {task.upper()} models served here: {known}", model=name
            )
        model = self.models[target]
        if model.task != task:
            raise UnknownModel(
                f"model '{name}' is a {model.task.upper()} model and cannot be used for {task.upper()}",
                model=name,
            )
        return model

    def default_voice(self, model: ModelInfo) -> str | None:
        wanted = self.settings.aliases.default_voice
        if wanted and (not model.voices or any(v.id == wanted for v in model.voices)):
            return wanted
        return model.voices[0].id if model.voices else None

    def resolve_voice(self, model: ModelInfo, voice: str | None) -> str | None:
        """The voice id to send to the worker (None: the engine's default)."""
        if not voice:
            return self.default_voice(model)
        if len(voice) > 128:
            raise InvalidInput("voice id is longer than 128 characters", param="voice")
        for v in model.voices:
            if v.id == voice or v.id.lower() == voice.lower():
                return v.id
        if voice in self.settings.aliases.voices or voice.lower() in self.settings.aliases.voices:
            return self.default_voice(model)
        if not model.voices:
            return voice  # the pool did not publish a voice list; let the engine decide
        known = ", ".join(v.id for v in model.voices)
        raise UnknownVoice(
            f"voice '{voice}' does not exist for model '{model.name}'; voices: {known}", voice=voice
        )

    async def wait_for_worker(self, model: str, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a live worker of ``model`` (cold start); checks Redis directly."""
        if self.live.get(model, 0) > 0:
            return True
        if self.redis is None or timeout_s <= 0:
            return False
        deadline = time.monotonic() + timeout_s
        ttl_ms = self.settings.queue.worker_ttl_s * 1000
        while True:
            try:
                now_ms = time.time() * 1000
                if await self.redis.zcount(self.keys.workers(model), now_ms - ttl_ms, "+inf") > 0:
                    self.live[model] = max(self.live.get(model, 0), 1)
                    return True
            except Exception:  # Redis trouble surfaces through the job call; here it means "not yet"
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.1, left))
