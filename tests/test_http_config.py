"""HTTP/Kubernetes target settings (lictor_addons.http._config, _tls): checked before anything listens."""

import base64
import stat
from pathlib import Path
from typing import Any

import pytest
from lictor import Target
from lictor_addons.http._config import TargetConfigError, parse_target
from lictor_addons.http._tls import ensure_ca, untrusted_ca, upstream_context

from .test_http_proxy import make_ca


def target(tmp_path: Path, **settings: Any) -> Any:
    base = {"protocol": "http", "listen": "127.0.0.1:8080", "upstream": "https://api.example.com:8443/base/"}
    return parse_target(Target("api", "http", {**base, **settings}), lambda p: tmp_path / p, tmp_path / "state")


def test_upstream_url_and_mode(tmp_path: Path) -> None:
    t = target(tmp_path)
    assert (t.scheme, t.upstream_host, t.upstream_port, t.base_path) == ("https", "api.example.com", 8443, "/base")
    assert t.mode_spec == "reverse:https://api.example.com:8443@127.0.0.1:8080"
    assert t.tls and t.max_body == 16 * 1024 * 1024 and t.approval_mode == "hold"
    v6 = target(tmp_path, listen="[::1]:9000", upstream="http://[fd00::1]:80")
    assert v6.mode_spec == "reverse:http://[fd00::1]:80@::1:9000"


def test_credentials_become_headers_the_agent_never_sends(tmp_path: Path) -> None:
    t = target(
        tmp_path,
        credentials={"basic": {"user": "svc", "password": "p:w"}, "header": {"name": "X-Api-Key", "value": "k"}},
    )
    assert dict(t.credentials.headers) == {
        "Authorization": "Basic " + base64.b64encode(b"svc:p:w").decode(),
        "X-Api-Key": "k",
    }


def test_client_certificate_is_combined_into_a_private_file(tmp_path: Path) -> None:
    _, cert, key = make_ca(tmp_path)
    t = target(tmp_path, credentials={"client_cert": {"cert": cert.name, "key": key.name}})
    path = t.credentials.client_cert_file
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes() and b"CERTIFICATE" in path.read_bytes()
    upstream_context(t)  # loads it (raises on a key that does not match the certificate)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"listen": "8080"}, "listen must be HOST:PORT"),
        ({"upstream": "ftp://x"}, "http:// or https://"),
        ({"upstream": "https://user:pw@api"}, "credentials"),
        ({"upstream": "https://api?x=1"}, "query"),
        ({"tls": {"enabled": False}, "listen": "0.0.0.0:8080"}, "clear text"),
        ({"tls": {"cert": "missing.pem"}}, "both cert and key"),
        ({"upstream_ca": "missing.pem"}, "does not exist"),
        ({"upstream_ca": "ca.pem", "upstream_insecure": True}, "exclude each other"),
        ({"credentials": {"bearer": "a", "basic": {"user": "u", "password": "p"}}}, "exclude each other"),
        ({"credentials": {"header": {"name": "Bad Name", "value": "v"}}}, "valid name"),
        ({"credentials": {"header": {"name": "X-Lictor-Reason", "value": "v"}}}, "may not set"),
        ({"credentials": {"bearer": "a\r\nX-Evil: 1"}}, "line break"),
        ({"upstream": "http://api", "credentials": {"client_cert": {"cert": "c", "key": "k"}}}, "does not exist"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(tmp_path: Path, settings: dict[str, Any], problem: str) -> None:
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(TargetConfigError, match=problem):
        target(tmp_path, **settings)


def test_gateway_ca_is_created_once(tmp_path: Path) -> None:
    confdir = ensure_ca(tmp_path)
    ca = (confdir / "ca.crt").read_bytes()
    assert b"BEGIN CERTIFICATE" in ca
    assert ensure_ca(tmp_path) == confdir and (confdir / "ca.crt").read_bytes() == ca
    assert untrusted_ca(tmp_path).read_bytes() != ca


def test_locations_on_the_upstream_become_paths_on_the_gateway(tmp_path: Path) -> None:
    from lictor_addons.http._proxy import location_for_agent

    t = target(tmp_path)  # https://api.example.com:8443/base
    moved = {
        "https://api.example.com:8443/base/v1/x?page=2#f": "/v1/x?page=2#f",
        "https://API.example.com:8443/base": "/",
        "/base/v1/x": "/v1/x",
    }
    for location, expected in moved.items():
        assert location_for_agent(location, t) == expected, location
    kept = [
        "https://api.example.com/base/v1/x",  # another port
        "http://api.example.com:8443/base/v1/x",  # another scheme
        "https://other.example.com:8443/base/v1/x",
        "https://user:pw@api.example.com:8443/base/v1/x",
        "https://api.example.com:8443/elsewhere",  # outside the base path
        "https://api.example.com:8443/basement",
        "/elsewhere",
        "v1/x",
        "https://api.example.com:99999/base",  # not a port
    ]
    for location in kept:
        assert location_for_agent(location, t) is None, location
    plain = target(tmp_path, upstream="http://10.0.0.5")
    assert location_for_agent("http://10.0.0.5:80/v1/x", plain) == "/v1/x"
    assert location_for_agent("/v1/x", plain) is None
