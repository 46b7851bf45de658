"""The SpeechDeployment's result cache settings as the API server receives them: env from the settings model's
names, the STT cache key mounted from its Secret (never inline), and the API settings accepting what is
rendered."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubespeech.api.settings import ApiSettings
from kubespeech_operator.builders import build_children
from kubespeech_operator.spec import SpecError, parse_spec

BASE: dict[str, Any] = {
    "license": {"secretRef": {"name": "lic", "key": "license.key"}},
    "api": {"apiKeysSecretRef": {"name": "keys", "key": "keys"}},
    "tts": {"pools": [{"name": "cpu", "modelName": "piper-joe", "engine": "piper"}]},
}
EXTERNAL = {"mode": "external", "external": {"url": "rediss://redis.example:6380/0"}}


def api_container(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    children = build_children("s", "ns", parse_spec(spec), owner=None, redis_password="pw")
    (deployment,) = [c for c in children if c["kind"] == "Deployment" and c["metadata"]["name"] == "s-api"]
    pod = deployment["spec"]["template"]["spec"]
    return pod["containers"][0], pod


def cache_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("KUBESPEECH_API_CACHE__")}


def api_settings_from(envs: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ApiSettings:
    for name, value in envs.items():
        monkeypatch.setenv(name, value)
    return ApiSettings()


def test_defaults_cache_tts_and_not_stt(monkeypatch: pytest.MonkeyPatch) -> None:
    container, _ = api_container(BASE)
    envs = cache_env(container)
    assert envs["KUBESPEECH_API_CACHE__TTS__ENABLED"] == "true"
    assert envs["KUBESPEECH_API_CACHE__ASR__ENABLED"] == "false"
    settings = api_settings_from(envs, monkeypatch)
    assert settings.cache.tts.enabled and not settings.cache.asr.enabled
    assert settings.cache.tts.max_bytes == 256 * 1024 * 1024


def test_stt_cache_with_a_key_mounts_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = copy.deepcopy(BASE)
    spec["redis"] = EXTERNAL
    spec["cache"] = {
        "tts": {"maxBytes": 64 * 1024 * 1024, "ttlSeconds": 3600},
        "asr": {"enabled": True, "encryptionKeySecretRef": {"name": "cache-key", "key": "k"}},
    }
    container, pod = api_container(spec)
    envs = cache_env(container)
    assert envs["KUBESPEECH_API_CACHE__TTS__MAX_BYTES"] == str(64 * 1024 * 1024)
    assert envs["KUBESPEECH_API_CACHE__TTS__TTL_S"] == "3600"
    assert envs["KUBESPEECH_API_CACHE__ASR__ENABLED"] == "true"
    key_path = envs["KUBESPEECH_API_CACHE__ASR__KEY_FILE"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "cache-key"]
    assert volume["secret"] == {"secretName": "cache-key", "items": [{"key": "k", "path": "key"}]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "cache-key"]
    assert key_path == f"{mount['mountPath']}/key" and mount["readOnly"] is True
    assert "KUBESPEECH_API_CACHE__ASR__UNENCRYPTED_IN_EMBEDDED_REDIS" not in envs
    settings = api_settings_from(envs, monkeypatch)
    assert settings.cache.asr.enabled and str(settings.cache.asr.key_file) == key_path


def test_stt_cache_without_a_key_only_in_embedded_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = copy.deepcopy(BASE)
    spec["cache"] = {"asr": {"enabled": True}}
    container, pod = api_container(spec)
    envs = cache_env(container)
    assert envs["KUBESPEECH_API_CACHE__ASR__UNENCRYPTED_IN_EMBEDDED_REDIS"] == "true"
    assert not any(v["name"] == "cache-key" for v in pod["volumes"])
    assert api_settings_from(envs, monkeypatch).cache.asr.enabled
    spec["redis"] = EXTERNAL
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.field_path == "spec.cache.asr.encryptionKeySecretRef"
    assert "external Redis" in info.value.message
    # The API server refuses the same combination on its own, whoever configures it.
    monkeypatch.delenv("KUBESPEECH_API_CACHE__ASR__UNENCRYPTED_IN_EMBEDDED_REDIS")
    with pytest.raises(ValidationError, match="key_file"):
        ApiSettings()
