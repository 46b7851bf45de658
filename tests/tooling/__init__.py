"""Tests of the fresh-machine tooling: the torch installer and the Makefile."""
