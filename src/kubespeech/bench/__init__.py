"""``kubespeech bench``: benchmark suites that print a table and write JSON."""
