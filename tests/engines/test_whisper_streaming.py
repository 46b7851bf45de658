"""Whisper streaming sessions on piper speech fed as a live client sends it: partials, finals, flush, resume."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pytest

from kubespeech.engines.base import AsrStream, Audio, StreamEvent, StreamingAsrEngine
from kubespeech.engines.whisper import WhisperEngine
from kubespeech.errors import InvalidInput
from tests.engines.conftest import SENTENCES, wer

RATE = 16000
CHUNK = 2048  # samples: one 4096-byte frame of 16-bit PCM, as a websocket client sends it
GAP_S = 0.8


def pcm16(audio: Audio) -> Audio:
    """Through 16-bit PCM and back, like every live frame."""
    ints = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    return (ints.astype(np.float32) / 32768).astype(np.float32)


def speech_bounds(audio: Audio) -> tuple[int, int]:
    """First and last loud sample: piper pads its clips with quiet, which is not part of the phrase."""
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    return int(loud[0]), int(loud[-1]) + 1


@dataclass
class Conversation:
    audio: Audio
    texts: list[str]
    spans: list[tuple[int, int]]  # (speech start, speech end) of each sentence, in stream samples


@dataclass
class Emitted:
    event: StreamEvent
    position: int  # stream samples accepted when the event came out
    compute_s: float  # wall time of the accept() call that returned it


@pytest.fixture(scope="module")
def conversation(spoken: list[Audio]) -> Conversation:
    gap = np.zeros(int(GAP_S * RATE), dtype=np.float32)
    pieces: list[Audio] = [gap[: RATE // 2]]
    spans = []
    for audio in spoken[:3]:
        offset = sum(len(p) for p in pieces)
        first, last = speech_bounds(audio)
        spans.append((offset + first, offset + last))
        pieces += [audio, gap]
    return Conversation(audio=pcm16(np.concatenate(pieces)), texts=SENTENCES[:3], spans=spans)


def feed(stream: AsrStream, audio: Audio, start: int = 0) -> list[Emitted]:
    out = []
    for i in range(0, len(audio), CHUNK):
        chunk = audio[i : i + CHUNK]
        started = time.perf_counter()
        events = stream.accept(chunk)
        elapsed = time.perf_counter() - started
        out += [Emitted(e, start + i + len(chunk), elapsed) for e in events]
    return out


def finals(emitted: list[Emitted]) -> list[StreamEvent]:
    return [e.event for e in emitted if e.event.kind == "final"]


@pytest.fixture(scope="module")
def live(
    whisper: WhisperEngine, conversation: Conversation
) -> tuple[list[Emitted], list[StreamEvent], float]:
    stream = whisper.open_stream(language="en", word_timestamps=True, eou_timeout_ms=600)
    started = time.perf_counter()
    emitted = feed(stream, conversation.audio)
    elapsed = time.perf_counter() - started
    return emitted, stream.close(), elapsed


def test_engine_and_stream_satisfy_the_protocols(whisper: WhisperEngine) -> None:
    assert isinstance(whisper, StreamingAsrEngine)
    stream = whisper.open_stream()
    assert isinstance(stream, AsrStream)
    assert stream.committed_samples == 0
    with pytest.raises(InvalidInput):
        whisper.open_stream(eou_timeout_ms=0)
    with pytest.raises(InvalidInput):
        whisper.open_stream(language="xx")


def test_partials_come_early_and_each_pause_ends_a_sentence(
    live: tuple[list[Emitted], list[StreamEvent], float], conversation: Conversation
) -> None:
    emitted, tail, elapsed = live
    audio_s = len(conversation.audio) / RATE
    texts = [e.event.text for e in emitted]
    assert tail == [], "every sentence should have been final before the stream closed"
    done = [e for e in emitted if e.event.kind == "final"]
    assert len(done) == 3, texts
    assert wer(conversation.texts, [e.event.text for e in done]) <= 0.15, texts
    nexts = [s for s, _ in conversation.spans[1:]] + [len(conversation.audio)]
    for final, (start, end), nxt in zip(done, conversation.spans, nexts, strict=True):
        # Final at the pause: after the sentence's speech, before the next sentence starts.
        assert end < final.position <= nxt, (final.event.text, end, final.position)
        # Stream times: the words sit inside the sentence's own speech.
        words = final.event.words
        assert words and abs(words[0].start - start / RATE) < 0.4 and abs(words[-1].end - end / RATE) < 0.4
        assert [w.start for w in words] == sorted(w.start for w in words)
        assert final.event.start <= words[0].start and final.event.end >= words[-1].end - 0.01
    # Partials: several per sentence, each before that sentence's speech ended, never carrying words.
    for k, (start, end) in enumerate(conversation.spans):
        before_final = [e for e in emitted if e.event.kind == "partial" and start < e.position <= end]
        assert before_final, f"no partial while sentence {k} was being spoken"
        assert all(e.event.words == [] for e in before_final)
    # Speculative decodes at pauses surface as partials too: those carry no words either.
    assert all(e.event.words == [] for e in emitted if e.event.kind == "partial")
    last = before_final[-1].event.text.lower().split()
    assert last and last[0] in conversation.texts[2].lower()  # a partial is a prefix-ish hypothesis

    # Measured, not asserted (2-core CPU): latency as a live client sees it = audio it still had to send
    # after the phrase ended + compute time of the accept() call that returned the event.
    lat = [
        (f.position - end) / RATE + f.compute_s for f, (_, end) in zip(done, conversation.spans, strict=True)
    ]
    first_partial = next(e for e in emitted if e.event.kind == "partial")
    ttfp = (first_partial.position - conversation.spans[0][0]) / RATE + first_partial.compute_s
    decode = sorted(e.compute_s for e in emitted)
    print(
        f"\nwhisper stream: {audio_s:.1f} s of audio in {elapsed:.2f} s (RTF {elapsed / audio_s:.2f}),"
        f" {len(emitted) - 3} partials + 3 finals; end of phrase -> final: "
        f"p50 {np.percentile(lat, 50) * 1000:.0f} ms, p95 {np.percentile(lat, 95) * 1000:.0f} ms "
        f"({', '.join(f'{x * 1000:.0f}' for x in lat)} ms; eou 600 ms); "
        f"speech onset -> first partial {ttfp * 1000:.0f} ms; decode call p50 {np.median(decode) * 1000:.0f} ms"
    )


def test_finalize_flushes_mid_utterance_and_the_stream_goes_on(
    whisper: WhisperEngine, spoken: list[Audio]
) -> None:
    audio = pcm16(spoken[3])
    first, last = speech_bounds(audio)
    cut = (first + last) // 2 // CHUNK * CHUNK
    stream = whisper.open_stream(partial_interval_s=None)
    assert finals(feed(stream, audio[:cut])) == []  # no pause yet: the utterance is still open
    [flushed] = stream.finalize()
    assert flushed.kind == "final" and 2 <= len(flushed.text.split()) <= 8, flushed.text
    assert stream.committed_samples == cut
    assert stream.finalize() == []  # nothing left to flush
    rest = finals(feed(stream, audio[cut:], start=cut)) + stream.close()
    assert len(rest) == 1 and rest[0].start >= (cut - 0.3 * RATE) / RATE
    # The two halves together are the sentence (a word cut in two may be lost, no more).
    assert wer([SENTENCES[3]], [f"{flushed.text} {rest[0].text}"]) <= 0.25, (flushed.text, rest[0].text)
    assert stream.close() == []
    with pytest.raises(InvalidInput):
        stream.accept(audio[:CHUNK])


def test_a_resumed_stream_produces_the_rest(whisper: WhisperEngine, conversation: Conversation) -> None:
    audio = conversation.audio
    # The first worker dies while the second sentence is half spoken.
    crash = sum(conversation.spans[1]) // 2 // CHUNK * CHUNK
    first = whisper.open_stream(word_timestamps=True)
    sent = finals(feed(first, audio[:crash]))
    committed = first.committed_samples
    assert len(sent) == 1
    # The settled point lies between the end of the first sentence and the start of the second.
    assert conversation.spans[0][1] < committed <= conversation.spans[1][0]
    second = whisper.open_stream(word_timestamps=True, start_sample=committed)
    assert second.committed_samples == committed
    rest = finals(feed(second, audio[committed:], start=committed)) + second.close()
    assert len(rest) == 2, [f.text for f in rest]
    assert wer(conversation.texts, [f.text for f in sent + rest]) <= 0.15, [f.text for f in sent + rest]
    # The resumed stream keeps the original time base.
    assert abs(rest[0].words[0].start - conversation.spans[1][0] / RATE) < 0.4
    assert abs(rest[1].words[0].start - conversation.spans[2][0] / RATE) < 0.4


def test_noise_and_silence_give_no_spurious_text(whisper: WhisperEngine) -> None:
    rng = np.random.default_rng(0)
    garbage = np.concatenate(
        [
            np.zeros(2 * RATE, dtype=np.float32),
            (rng.standard_normal(4 * RATE) * 0.1).astype(np.float32),  # loud white noise
            (np.sin(np.arange(2 * RATE) * 2 * np.pi * 1000 / RATE) * 0.3).astype(np.float32),  # a tone
            (rng.uniform(-1, 1, RATE) * 0.8).astype(np.float32),  # near-clipping static
            np.zeros(RATE, dtype=np.float32),
        ]
    )
    stream = whisper.open_stream()
    events = [e.event for e in feed(stream, pcm16(garbage))] + stream.close()
    words = sum(len(e.text.split()) for e in events if e.kind == "final")
    assert words <= 3, [e.text for e in events]
    # All but the trailing quiet kept as onset context is settled.
    assert len(garbage) - RATE <= stream.committed_samples <= len(garbage)


def test_overlong_speech_is_cut_into_several_finals(whisper: WhisperEngine, spoken: list[Audio]) -> None:
    # Three sentences back to back (no pause long enough to end an utterance), 4 s utterance limit.
    speech = pcm16(np.concatenate(spoken[:3]))
    stream = whisper.open_stream(partial_interval_s=None, max_utterance_s=4.0)
    done = finals(feed(stream, speech)) + stream.close()
    assert len(done) >= 3
    assert all(b.start >= a.end - 0.05 for a, b in itertools.pairwise(done))
    score = wer([" ".join(SENTENCES[:3])], [" ".join(f.text for f in done)])
    print(
        f"\nstream over {len(speech) / RATE:.1f} s without pauses, cut into {len(done)} finals: WER {score:.1%}"
    )
    assert score <= 0.25  # a hard cut can split a word; most text must survive


class CountingDecodes:
    """Counts the real engine's decodes (the engine still does the work: this only observes the calls)."""

    def __init__(self, whisper: WhisperEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        decode = whisper._decode

        def counted(*args: object, **kwargs: object) -> object:
            self.calls += 1
            return decode(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(whisper, "_decode", counted)


def test_the_final_is_decoded_while_the_endpoint_silence_runs(
    whisper: WhisperEngine, spoken: list[Audio], monkeypatch: pytest.MonkeyPatch
) -> None:
    audio = pcm16(spoken[0])
    _, end = speech_bounds(audio)
    quiet = np.zeros(RATE, dtype=np.float32)
    decodes = CountingDecodes(whisper, monkeypatch)
    stream = whisper.open_stream(language="en", partial_interval_s=None, eou_timeout_ms=600)
    calls_at_final: list[tuple[int, int]] = []
    out: list[StreamEvent] = []
    for i in range(0, len(audio) + len(quiet), CHUNK):
        chunk = np.concatenate([audio, quiet])[i : i + CHUNK]
        before = decodes.calls
        events = stream.accept(chunk)
        out += events
        if any(e.kind == "final" for e in events):
            calls_at_final.append((before, decodes.calls))
    [final] = [e for e in out if e.kind == "final"]
    assert wer([SENTENCES[0]], [final.text]) <= 0.15, final.text
    # Partials are off, so every decode was speculative (one per pause in the speech, the sentence's
    # end among them); the call that reached the endpoint decoded nothing and reused the last one.
    assert 1 <= decodes.calls <= 3
    assert calls_at_final == [(decodes.calls, decodes.calls)]
    # That speculative decode surfaced as a partial with the same text, just before the final.
    assert [e.kind for e in out][-2:] == ["partial", "final"] and out[-2].text == final.text
    assert out[-2].end <= final.end + 0.01 and final.end < (end / RATE) + 0.4


def test_finalize_after_a_pause_reuses_the_speculative_decode_and_speech_after_it_does_not(
    whisper: WhisperEngine, spoken: list[Audio], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Piper pads its clips with quiet; trimmed, the pause between them is exactly the one chosen here.
    first, second = pcm16(spoken[1]), pcm16(spoken[2])
    first, second = first[: speech_bounds(first)[1]], second[slice(*speech_bounds(second))]
    pause = np.zeros(int(0.35 * RATE), dtype=np.float32)  # past the padding, short of the 600 ms endpoint
    decodes = CountingDecodes(whisper, monkeypatch)
    stream = whisper.open_stream(language="en", partial_interval_s=None, eou_timeout_ms=600)
    assert finals(feed(stream, np.concatenate([first, pause]))) == []
    assert decodes.calls == 1  # the speculative decode
    [flushed] = stream.finalize()
    assert decodes.calls == 1, "finalize after a pause must not decode again"
    assert wer([SENTENCES[1]], [flushed.text]) <= 0.15, flushed.text

    # Speech resumes after a pause and the flush comes as it ends: the speculation of the first half is
    # dropped, and the final is decoded anew and covers both.
    both = np.concatenate([first, pause, second])
    stream = whisper.open_stream(language="en", partial_interval_s=None, eou_timeout_ms=600)
    assert finals(feed(stream, both)) == []
    calls = decodes.calls
    [flushed] = stream.finalize()
    assert decodes.calls == calls + 1, "speech after the speculative decode must be decoded in the final"
    assert wer([f"{SENTENCES[1]} {SENTENCES[2]}"], [flushed.text]) <= 0.2, flushed.text


def test_audio_arriving_in_one_late_batch_still_ends_each_phrase_at_its_pause(
    whisper: WhisperEngine, conversation: Conversation
) -> None:
    # A worker that fell behind reads many frames at once: three phrases and their pauses in one call.
    stream = whisper.open_stream(language="en", partial_interval_s=None, eou_timeout_ms=600)
    done = [e for e in stream.accept(conversation.audio) if e.kind == "final"] + stream.close()
    assert len(done) == 3, [e.text for e in done]
    assert wer(conversation.texts, [e.text for e in done]) <= 0.15, [e.text for e in done]
    for final, (start, end) in zip(done, conversation.spans, strict=True):
        assert abs(final.start - start / RATE) < 0.4 and abs(final.end - end / RATE) < 0.4


def test_the_stream_window_cuts_only_padding() -> None:
    from kubespeech.engines.whisper import _trim_padding

    features = np.zeros((80, 3000), dtype=np.float32)
    features[:, :250] = 0.5  # 2.5 s of content, then pad_or_trim's zeros
    assert _trim_padding(features, 1000).shape == (80, 1000)  # the 10 s window
    assert _trim_padding(features, 100).shape == (80, 400)  # content + 1 s, in whole seconds
    features[:, 2950] = 0.1  # content (not padding) near the end: nothing may be cut
    assert _trim_padding(features[None], 1000).shape == (1, 80, 3000)


def test_stream_window_option_is_checked() -> None:
    with pytest.raises(InvalidInput, match="stream_window_s"):
        WhisperEngine(stream_window_s=0.5)
    with pytest.raises(InvalidInput, match="stream_window_s"):
        WhisperEngine(streamWindowS=31)
