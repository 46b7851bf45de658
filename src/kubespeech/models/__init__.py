"""Model files: fetching them into a cache (`kubespeech model fetch`) and tiny NeMo models for tests."""
