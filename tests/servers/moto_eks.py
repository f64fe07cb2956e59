"""moto's server mode on 127.0.0.1 as the EKS API (real HTTP; boto3 unchanged), once per session.

`moto_eks` yields the endpoint URL; `eks_cluster` creates an EKS cluster there (node groups need
one) and yields its name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from modelship.runtime.demo import free_port

REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_eks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto_server on a free loopback port; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    moto_server = Path(sys.executable).parent / "moto_server"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto_server did not start: {log.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def eks_cluster(moto_eks: str) -> str:
    """An EKS cluster in moto, with fake credentials for boto3."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    eks = boto3.client("eks", region_name=REGION, endpoint_url=moto_eks)
    eks.create_cluster(
        name="modelship-test",
        roleArn="arn:aws:iam::123456789012:role/eks-cluster",
        resourcesVpcConfig={"subnetIds": ["subnet-aaaa", "subnet-bbbb"]},
    )
    return "modelship-test"
