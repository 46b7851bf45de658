"""A bounded schemathesis run over every HTTP route (the longer one: ``python -m tests.api.fuzz``)."""

from __future__ import annotations

import pytest

from tests.api.conftest import Workers
from tests.api.fuzz import run_fuzz
from tests.conftest import RedisServer


def test_openapi_fuzz_no_5xx_and_no_schema_violations(
    api_redis: RedisServer, noop_workers: Workers, tmp_path_factory: pytest.TempPathFactory
) -> None:
    result = run_fuzz(api_redis.url, tmp_path_factory.mktemp("fuzz"), max_examples=4, seed=7)
    assert result.returncode == 0, result.output[-6000:]
    assert result.cases >= 500, result.output[-3000:]
