"""``kubespeech model fetch s3://...`` against a real S3 API (moto's server) on loopback: objects, prefixes, errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

boto3 = pytest.importorskip("boto3", reason="the s3 extra (boto3) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")

from kubespeech.models.fetch import (  # noqa: E402
    MANIFEST,
    PARTIAL_DIR,
    AccessDenied,
    BadSource,
    NotFound,
    Progress,
    fetch,
)

KUBESPEECH = str(Path(sys.executable).with_name("kubespeech"))
BLOB = bytes(range(256)) * 4096 * 3  # 3 MiB: several read chunks, every byte position distinguishable
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never ask an EC2 metadata service for credentials from a test machine.
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3:
    endpoint: str
    client: Any  # a boto3 S3 client talking to the server

    def bucket(self, objects: dict[str, bytes]) -> str:
        """A fresh bucket holding ``objects``: tests share one server, never a bucket."""
        name = f"models-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        for key, data in objects.items():
            self.client.put_object(Bucket=name, Key=key, Body=data)
        return name


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return S3(s3_server, boto3.client("s3", endpoint_url=s3_server))


def quiet() -> Progress:
    return Progress(tty=False)


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command the operator's model-fetch Job runs, with the env its Secret would give it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    full_env.update(KUBESPEECH_LOG_LEVEL="WARNING", AWS_SHARED_CREDENTIALS_FILE=os.devnull, **env)
    return subprocess.run(
        [KUBESPEECH, "model", "fetch", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_cli_fetches_a_single_object_with_its_sha256(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"asr/parakeet.nemo": BLOB})
    dest = tmp_path / "cache"
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint}
    done = cli(f"s3://{bucket}/asr/parakeet.nemo", "--to", str(dest), "--sha256", BLOB_SHA, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(dest / "parakeet.nemo")
    assert (dest / "parakeet.nemo").read_bytes() == BLOB
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "parakeet.nemo"]  # no staging left
    again = cli(f"s3://{bucket}/asr/parakeet.nemo", "--to", str(dest), "--sha256", BLOB_SHA, env=env)
    assert again.returncode == 0, again.stderr
    assert "already present" in again.stderr


def test_the_service_specific_endpoint_variable_is_honoured(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"m.nemo": b"x" * 100})
    env = {**AWS_ENV, "AWS_ENDPOINT_URL_S3": s3.endpoint}
    done = cli(f"s3://{bucket}/m.nemo", "--to", str(tmp_path / "c"), env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "c" / "m.nemo").read_bytes() == b"x" * 100


def test_a_prefix_fetches_every_object_under_it(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket(
        {
            "tts/fastpitch/model.nemo": BLOB,
            "tts/fastpitch/config/model_config.yaml": b"sample_rate: 22050\n",
            "tts/fastpitch/": b"",  # a "folder" marker as consoles create them
            "tts/other.nemo": b"not under the prefix",
        }
    )
    dest = tmp_path / "cache"
    result = fetch(f"s3://{bucket}/tts/fastpitch/", dest, progress=quiet())
    names = sorted(str(p.relative_to(dest)) for p in result.paths)
    assert names == ["config/model_config.yaml", "model.nemo"]
    assert (dest / "model.nemo").read_bytes() == BLOB
    assert (dest / "config" / "model_config.yaml").read_bytes() == b"sample_rate: 22050\n"
    assert not (dest / "other.nemo").exists()
    assert not (dest / PARTIAL_DIR).exists()
    only = fetch(f"s3://{bucket}/tts/fastpitch/", tmp_path / "only", include="*.nemo", progress=quiet())
    assert [p.name for p in only.paths] == ["model.nemo"]
    with pytest.raises(BadSource, match="single-file"):
        fetch(f"s3://{bucket}/tts/fastpitch/", tmp_path / "x", sha256=BLOB_SHA, progress=quiet())


def test_wrong_sha256_fails_and_leaves_no_partial_file(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"model.nemo": BLOB})
    dest = tmp_path / "cache"
    done = cli(
        f"s3://{bucket}/model.nemo", "--to", str(dest), "--sha256", "0" * 64,
        env={**AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint},
    )  # fmt: skip
    assert done.returncode == 5, done.stderr
    assert "does not match the expected" in done.stderr
    assert not dest.exists()  # created by this run, so removed again with everything in it
    existing = tmp_path / "existing"
    existing.mkdir()
    done = cli(
        f"s3://{bucket}/model.nemo", "--to", str(existing), "--sha256", "0" * 64,
        env={**AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint},
    )  # fmt: skip
    assert done.returncode == 5
    assert list(existing.iterdir()) == []


def test_an_interrupted_download_resumes_from_the_partial_file(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"model.nemo": BLOB})
    dest = tmp_path / "cache"
    # What a run cut off by the network leaves behind: the first MiB in the staging directory.
    (dest / PARTIAL_DIR).mkdir(parents=True)
    (dest / PARTIAL_DIR / "model.nemo").write_bytes(BLOB[: 1 << 20])
    fetch(f"s3://{bucket}/model.nemo", dest, sha256=BLOB_SHA, progress=quiet())
    assert (dest / "model.nemo").read_bytes() == BLOB
    # A partial file longer than the object (the object was replaced) is discarded, not trusted.
    other = tmp_path / "other"
    (other / PARTIAL_DIR).mkdir(parents=True)
    (other / PARTIAL_DIR / "model.nemo").write_bytes(b"z" * (len(BLOB) + 10))
    fetch(f"s3://{bucket}/model.nemo", other, sha256=BLOB_SHA, progress=quiet())
    assert (other / "model.nemo").read_bytes() == BLOB


def test_missing_key_and_missing_bucket_are_not_found(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"dir/model.nemo": b"m"})
    env = {**AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint}
    key = cli(f"s3://{bucket}/nope.nemo", "--to", str(tmp_path / "a"), env=env)
    assert key.returncode == 3, key.stderr
    assert f"no such key: s3://{bucket}/nope.nemo" in key.stderr
    assert not (tmp_path / "a").exists()
    no_bucket = cli("s3://no-such-bucket-kubespeech/model.nemo", "--to", str(tmp_path / "b"), env=env)
    assert no_bucket.returncode == 3, no_bucket.stderr
    assert "no such bucket: s3://no-such-bucket-kubespeech" in no_bucket.stderr
    with pytest.raises(NotFound, match="no such bucket"):
        fetch("s3://no-such-bucket-kubespeech/dir/", tmp_path / "c", progress=quiet())
    with pytest.raises(NotFound, match="no objects under"):
        fetch(f"s3://{bucket}/empty/", tmp_path / "c", progress=quiet())
    with pytest.raises(NotFound, match=f"use s3://{bucket}/dir/"):
        fetch(f"s3://{bucket}/dir", tmp_path / "c", progress=quiet())
    assert not (tmp_path / "c").exists()


def test_no_credentials_is_a_clear_access_error(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"model.nemo": b"m"})
    env = {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": s3.endpoint,
    }
    done = cli(f"s3://{bucket}/model.nemo", "--to", str(tmp_path / "c"), env=env)
    assert done.returncode == 4, done.stderr
    assert "no usable AWS credentials" in done.stderr
    assert "AWS_ACCESS_KEY_ID" in done.stderr
    assert not (tmp_path / "c").exists()


def test_credentials_the_store_rejects_are_access_denied(s3: S3, tmp_path: Path) -> None:
    bucket = s3.bucket({"model.nemo": b"m"})
    # From now on the server checks credentials: the test keys belong to no IAM user there.
    httpx.post(f"{s3.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        with pytest.raises(AccessDenied, match="access denied"):
            fetch(f"s3://{bucket}/model.nemo", tmp_path / "c", progress=quiet())
    finally:
        httpx.post(f"{s3.endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()
    assert not (tmp_path / "c").exists()


def test_without_boto3_the_message_says_what_to_install(s3: S3, tmp_path: Path) -> None:
    # The real CLI in a fresh interpreter in which importing boto3 fails, as in an image without the extra.
    code = (
        "import sys; sys.modules['boto3'] = None; from kubespeech.cli import main; "
        f"sys.argv = ['kubespeech', 'model', 'fetch', 's3://bucket/model.nemo', '--to', {str(tmp_path / 'c')!r}]; "
        "main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "s3:// sources need boto3: pip install boto3" in done.stderr
    assert not (tmp_path / "c").exists()
