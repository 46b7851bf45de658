"""models.json: the typed format the operator writes and the API's registry reads, and its bad inputs."""

from __future__ import annotations

import pytest

from kubespeech.api.models_file import ModelEntry, VoiceEntry, dump_models_file, load_models_file


def test_what_is_written_reads_back_the_same() -> None:
    entries = [
        ModelEntry(name="parakeet", task="asr", default=True, aliases=["pulse"], cold_start_wait_s=30),
        ModelEntry(name="piper-joe", task="tts", voices=["joe", VoiceEntry(id="amy", language="en")]),
    ]
    text = dump_models_file(entries)
    assert load_models_file(text.encode()) == entries
    assert '"cold_start_wait_s"' in text and text.count("cold_start_wait_s") == 1  # unset fields left out
    assert load_models_file(b'{"models": []}') == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not JSON"),
        (b'[{"name": "m", "task": "music"}]', "entry 0.task"),
        (b'[{"name": "", "task": "asr"}]', "entry 0.name"),
        (b'[{"name": "m", "task": "asr", "cold_start_wait_s": "soon"}]', "entry 0.cold_start_wait_s"),
        (b'[{"name": "m", "task": "asr", "cold_start_wait_s": 9999}]', "entry 0.cold_start_wait_s"),
        (b'[{"name": "m", "task": "asr", "languages": ["en"]}]', "entry 0.languages"),  # no writer emits it
        (b'[{"name": "m", "task": "asr"}, {"name": "m", "task": "tts"}]', "listed twice"),
        (b'{"name": "m"}', "expected a list"),
    ],
)
def test_bad_files_are_refused_naming_the_entry(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_models_file(data)
