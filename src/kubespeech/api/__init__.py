"""The API server: Smallest Waves v1, Smallest self-host legacy and OpenAI audio surfaces over one service layer."""
