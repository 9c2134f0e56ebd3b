"""A data dir on S3 named with an Airflow connection: `s3://<conn_id>@bucket/prefix` (issue 16).

Why: credentials could only come from the process environment, so every Airflow process needed
AWS_* variables and one set of credentials. Now the URL names an Airflow connection, as Airflow's
ObjectStoragePath does, and the provider's file system takes that connection's credentials,
region and endpoint. Here the moto S3 server's endpoint and keys are *only* in the connection (the
environment has none), so every request that succeeds went through it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs

from include.tier_sync import fileio, settings, storage_connection
from include.tier_sync.extract import extract_orders
from include.tier_sync.store import OrderStore
from tests.servers import s3_server
from tests.unit.test_extract import seeded_client, stored

pytestmark = pytest.mark.unit

CONN_ID = "tier_sync_s3"
KEY_ID = "AKIDCONNECTIONONLY"
SECRET_KEY = "conn-only-secret-7d1f"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with s3_server() as endpoint:
        yield endpoint


def aws_connection(endpoint: str, *, login: str | None = KEY_ID, password: str | None = SECRET_KEY) -> str:
    return json.dumps({
        "conn_type": "aws",
        "login": login,
        "password": password,
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    })


@pytest.fixture
def no_aws_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No credentials or endpoint anywhere but in the Airflow connection."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                 "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to fall back on
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    storage_connection.connection_filesystem.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    storage_connection.connection_filesystem.cache_clear()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket_url(s3_endpoint: str, no_aws_environment: None, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", aws_connection(s3_endpoint))
    bucket = f"tier-sync-{uuid.uuid4().hex[:12]}"
    boto = s3fs.S3FileSystem(key=KEY_ID, secret=SECRET_KEY, endpoint_url=s3_endpoint)
    boto.mkdir(bucket)
    return f"s3://{CONN_ID}@{bucket}"


def test_the_url_names_the_connection_and_the_bucket() -> None:
    assert storage_connection.split("s3://aws_default@bucket/tier-sync") == ("aws_default", "s3://bucket/tier-sync")
    assert storage_connection.split("s3://bucket/tier-sync") == (None, "s3://bucket/tier-sync")
    # Azure's own container@account form is not a connection id
    azure = "abfs://container@account.dfs.core.windows.net/tier-sync"
    assert storage_connection.split(azure) == (None, azure)
    assert settings.check_data_dir("s3://aws_default@bucket/tier-sync") == "s3://aws_default@bucket/tier-sync"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("s3://AKIAIOSFODNN7EXAMPLE@bucket/x", "looks like a credential"),
        ("s3://key:secret-value@bucket/x", "looks like a credential"),
        ("gs://google_cloud_default@bucket/x", "s3://, s3a:// only"),
        ("s3://aws_default@/x", "bucket"),
    ],
)
def test_anything_but_a_connection_id_before_the_at_is_refused(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=settings.VAR_DATA_DIR) as caught:
        settings.check_data_dir(value)
    assert reason in str(caught.value)
    assert "AKIAIOSFODNN7EXAMPLE" not in str(caught.value) and "secret-value" not in str(caught.value)


def test_the_order_store_works_through_the_connection_alone(bucket_url: str) -> None:
    root = f"{bucket_url}/store"
    store = OrderStore(root)
    client = seeded_client(sales=5, customers=3)
    extract_orders(client, store)
    assert stored(store, "sales") == {(r["id"], r["version"]) for r in client.feed("/sales")}
    # The connection's file system is a real S3 client with the connection's keys and endpoint.
    fs, path = fileio.filesystem(f"{root}/manifest.json")
    assert path.startswith(bucket_url.split("@", 1)[1]) and "@" not in path
    assert fileio.has_conditional_write(root)
    # Another process (a fresh store object) reads the same commits; conditional writes hold.
    other = OrderStore(root)
    assert other.cursors() == store.cursors()
    data, tag = fileio.read_bytes_tagged(store.manifest_url)
    fileio.write_bytes_if(store.manifest_url, data + b" ", etag=tag)  # same JSON, a new ETag
    with pytest.raises(fileio.WriteConflict):  # a second writer from the same read loses
        fileio.write_bytes_if(store.manifest_url, data, etag=tag)


def test_without_the_connection_the_same_bucket_is_unreachable(bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain URL has no endpoint or keys in this environment: it cannot list the bucket that
    the connection's URL reaches, so the successes above came through the connection."""
    plain = bucket_url.replace(f"{CONN_ID}@", "")
    fileio.write_text(f"{bucket_url}/probe.txt", "through the connection")
    assert fileio.read_text(f"{bucket_url}/probe.txt") == "through the connection"
    with pytest.raises(Exception):  # noqa: B017 (botocore's NoCredentialsError or an endpoint error)
        fileio.read_text(f"{plain}/probe.txt")


def test_a_connection_that_does_not_exist_is_an_error_naming_the_variable(no_aws_environment: None) -> None:
    with pytest.raises(storage_connection.StorageConnectionError, match=f"{settings.VAR_DATA_DIR}.*not defined"):
        fileio.exists("s3://tier_sync_missing_conn@bucket/tier-sync/manifest.json")


def test_a_connection_without_credentials_is_refused_not_read_anonymously(
    s3_endpoint: str, no_aws_environment: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_TIER_SYNC_ANON", aws_connection(s3_endpoint, login=None, password=None))
    with pytest.raises(storage_connection.StorageConnectionError, match="no credentials.*anonymously"):
        fileio.exists("s3://tier_sync_anon@bucket/tier-sync/manifest.json")
