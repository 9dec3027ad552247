"""Resolve ``aws:metadata:local-ipv4`` from the EC2 instance metadata service, IMDSv2 style.

IMDSv2 needs a session token first (PUT), then the value (GET with the token); IMDSv1-only
services are not supported because AWS recommends requiring v2. The endpoint is a setting so
tests can serve a fake one on loopback.
"""

from __future__ import annotations

import ipaddress

import requests

TOKEN_PATH = "/latest/api/token"
LOCAL_IPV4_PATH = "/latest/meta-data/local-ipv4"
TOKEN_TTL_SECONDS = "60"


class MetadataError(RuntimeError):
    pass


def fetch_local_ipv4(endpoint: str, timeout: float = 2.0) -> str:
    endpoint = endpoint.rstrip("/")
    session = requests.Session()
    session.trust_env = False
    try:
        token = session.put(endpoint + TOKEN_PATH, timeout=timeout,
                            headers={"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL_SECONDS})
        token.raise_for_status()
        answer = session.get(endpoint + LOCAL_IPV4_PATH, timeout=timeout,
                             headers={"X-aws-ec2-metadata-token": token.text.strip()})
        answer.raise_for_status()
    except requests.RequestException as exc:
        raise MetadataError(
            f"aws:metadata:local-ipv4 needs the EC2 instance metadata service (IMDSv2), but {endpoint} did "
            f"not answer ({type(exc).__name__}): run on EC2 with the metadata service on, set "
            f"--aws-metadata-endpoint, or give the address itself") from None
    value = answer.text.strip()
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise MetadataError(f"the metadata service at {endpoint} gave '{value[:40]}', not an IPv4 address") from None
