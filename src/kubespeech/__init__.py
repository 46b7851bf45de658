"""kubespeech: a self-hosted speech AI stack (API server, Redis job protocol, ASR/TTS workers, license proxy)."""

__version__ = "0.1.0"
