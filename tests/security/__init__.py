"""Security as tests: authentication, secrets kept out of logs and ConfigMaps, locked-down pods."""
