"""Container/codec detection from the first bytes of a file (never from a file name or a client's MIME type)."""

from __future__ import annotations

# Names returned by ``sniff_format``; each maps to one decoding path in ``decode``.
WAV = "wav"
FLAC = "flac"
OGG_VORBIS = "ogg_vorbis"
OGG_OPUS = "ogg_opus"
OGG = "ogg"  # an Ogg stream whose codec we could not see in the first page
MP3 = "mp3"
AAC = "aac"  # raw ADTS AAC
MP4 = "mp4"  # M4A / MP4 / MOV (ISO base media)
WEBM = "webm"  # WebM / Matroska
AIFF = "aiff"
CAF = "caf"

KNOWN_FORMATS = (WAV, FLAC, OGG_VORBIS, OGG_OPUS, OGG, MP3, AAC, MP4, WEBM, AIFF, CAF)


def _mp3_frame_sync(head: bytes) -> bool:
    # MPEG audio frame: 11 sync bits, a version other than "reserved", a layer other than "reserved",
    # a bitrate index other than 0b1111 and a sample-rate index other than 0b11.
    if len(head) < 4 or head[0] != 0xFF or (head[1] & 0xE0) != 0xE0:
        return False
    version = (head[1] >> 3) & 0x3
    layer = (head[1] >> 1) & 0x3
    bitrate = head[2] >> 4
    rate = (head[2] >> 2) & 0x3
    return version != 1 and layer != 0 and bitrate != 0xF and rate != 3


def _adts_sync(head: bytes) -> bool:
    # ADTS: 12 sync bits, layer 00 (that is what tells it apart from MPEG audio frames).
    return len(head) >= 7 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0


def sniff_format(data: bytes | memoryview) -> str | None:
    """Name the audio container/codec of ``data`` from its magic bytes, or None when it is not recognised."""
    head = bytes(data[:64])
    if len(head) < 4:
        return None
    if head[:4] in (b"RIFF", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return WAV
    if head[:4] == b"fLaC":
        return FLAC
    if head[:4] == b"OggS":
        first_page = bytes(data[:512])
        if b"OpusHead" in first_page:
            return OGG_OPUS
        if b"\x01vorbis" in first_page:
            return OGG_VORBIS
        return OGG
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return WEBM
    if head[4:8] == b"ftyp":
        return MP4
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return AIFF
    if head[:4] == b"caff":
        return CAF
    if head[:3] == b"ID3":
        return MP3
    if _adts_sync(head):
        return AAC
    if _mp3_frame_sync(head):
        return MP3
    return None
