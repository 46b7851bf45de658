"""Audio in and out of the API: format sniffing, decoding to mono PCM at the engine rate, and encoders."""

from kubespeech.audio.decode import (
    AudioLimits,
    DecodedAudio,
    EmptyAudio,
    decode_audio,
    decode_raw_pcm,
)
from kubespeech.audio.encode import (
    CONTENT_TYPES,
    OUTPUT_FORMATS,
    encode_audio,
    resample_pcm16,
)
from kubespeech.audio.sniff import sniff_format

__all__ = [
    "CONTENT_TYPES",
    "OUTPUT_FORMATS",
    "AudioLimits",
    "DecodedAudio",
    "EmptyAudio",
    "decode_audio",
    "decode_raw_pcm",
    "encode_audio",
    "resample_pcm16",
    "sniff_format",
]
