"""`fmhub server --s3-bucket`: LFS objects in an S3-compatible bucket (moto's server, started as `moto_server`), through giftless's S3 storage."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

from tests.helpers import committed_manifest, git, sha256_file
from tests.helpers.server import ADMIN, clone, init_root, running_server, use_token, work_tree

pytest.importorskip("boto3")
MOTO = shutil.which("moto_server")
pytestmark = pytest.mark.skipif(MOTO is None, reason="moto_server is not installed (pip install 'moto[s3]' flask-cors)")
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_endpoint(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.1)
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_objects_live_in_the_bucket_and_clone_back_byte_identical(tmp_path, s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="weights")
    root, admin, _reader = init_root(tmp_path)
    with running_server(root, "--s3-bucket", "weights", "--s3-endpoint", s3_endpoint, "--s3-prefix", "lfs", env=dict(os.environ)) as (url, _log):
        work = work_tree(tmp_path, {"m.safetensors": {"w": torch.randn(128, 64), "b": torch.randn(64)}})
        use_token(work, url, admin, ADMIN)
        git(work, "remote", "add", "origin", f"{url}/models.git")
        git(work, "push", "-q", "origin", "main")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="weights").get("Contents", [])}
        want = {f"lfs/_/models/{oid}" for oid, _size in committed_manifest(work, "HEAD", "m.safetensors").oids()}
        assert want and want <= keys
        assert not any((root / ".fmhub" / "lfs").rglob("*")) if (root / ".fmhub" / "lfs").exists() else True
        a, _ = clone(tmp_path, url, "models", admin, ADMIN, "admin-clone")
        assert sha256_file(a / "m.safetensors") == sha256_file(work / "m.safetensors")
