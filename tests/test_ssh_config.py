"""SSH target settings are checked in ``configure`` (files loaded, problems named), and the SFTP proxy
never falls back to asyncssh's local-file-system implementation."""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from lictor_addons.ssh._config import parse_target
from lictor_addons.ssh._sftp import OVERRIDDEN, ProxySFTPServer

from tests.conftest import require_binary


def _key(path: Path) -> Path:
    key = asyncssh.generate_private_key("ssh-ed25519", comment=path.name)
    path.write_bytes(key.export_private_key())
    path.chmod(0o600)
    Path(f"{path}.pub").write_bytes(key.export_public_key())
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Any]:
    key = _key(tmp_path / "upstream_key")
    host = asyncssh.generate_private_key("ssh-ed25519")
    known = tmp_path / "known_hosts"
    known.write_text(f"[10.0.0.5]:2200 {host.export_public_key().decode().strip()}\n")
    settings = {
        "protocol": "ssh",
        "listen": "127.0.0.1:2222",
        "upstream": {"host": "10.0.0.5", "port": 2200, "user": "ops", "key": str(key), "known_hosts": str(known)},
    }
    return {"settings": settings, "dir": tmp_path, "key": key, "known": known}


def _parse(files: dict[str, Any], **changes: Any) -> Any:
    settings = {**files["settings"], **changes}
    return parse_target("web", settings, lambda p: files["dir"] / p, files["dir"] / "state")


def test_a_valid_target_loads_and_creates_its_host_key(files: dict[str, Any]) -> None:
    cfg = _parse(files)
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 2222)
    assert cfg.upstream.port == 2200 and cfg.upstream.user == "ops"
    host_key = files["dir"] / "state" / "ssh" / "web_host_ed25519"
    assert host_key.exists() and host_key.stat().st_mode & 0o777 == 0o600
    again = _parse(files)  # the same key is reused, so agents' known_hosts stay valid
    assert again.host_key.public_data == cfg.host_key.public_data


def test_missing_files_and_empty_known_hosts_refuse_the_config(files: dict[str, Any]) -> None:
    up = files["settings"]["upstream"]
    with pytest.raises(ValueError, match=r"ssh target 'web': upstream.key: cannot read"):
        _parse(files, upstream={**up, "key": "nope"})
    empty = files["dir"] / "empty_known_hosts"
    empty.write_text("# nothing pinned\n")
    with pytest.raises(ValueError, match="has no host keys"):
        _parse(files, upstream={**up, "known_hosts": str(empty)})
    with pytest.raises(ValueError, match="listen must be HOST:PORT"):
        _parse(files, listen="2222")
    with pytest.raises(ValueError, match=r"public_keys\[0\]: not an OpenSSH public key"):
        _parse(files, public_keys=[{"key": "ssh-ed25519 AAAAnotbase64", "sub": "x"}])
    with pytest.raises(ValueError, match=r"user_ca\[0\]: cannot read"):
        _parse(files, user_ca=["missing_ca.pub"])


def test_public_keys_and_user_cas(files: dict[str, Any]) -> None:
    bob = _key(files["dir"] / "bob")
    ca = _key(files["dir"] / "ca")
    cfg = _parse(
        files,
        public_keys=[{"key": Path(f"{bob}.pub").read_text(), "sub": "bob", "claims": {"role": "ops"}}],
        user_ca=[f"{ca}.pub"],
    )
    bob_key = asyncssh.read_public_key(f"{bob}.pub")
    entry = cfg.key_identity(bob_key)
    assert entry is not None and entry.subject == "bob" and entry.claims == {"role": "ops"}
    assert cfg.key_identity(asyncssh.read_public_key(f"{ca}.pub")) is None
    assert cfg.is_trusted_ca(asyncssh.read_public_key(f"{ca}.pub"))
    assert not cfg.is_trusted_ca(bob_key)


def test_upstream_certificate_is_loaded(files: dict[str, Any]) -> None:
    require_binary("ssh-keygen")
    ca = _key(files["dir"] / "host_ca")
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "gw", "-n", "ops", f"{files['key']}.pub"],
        check=True,
        capture_output=True,
    )
    up = {**files["settings"]["upstream"], "certificate": f"{files['key']}-cert.pub"}
    cfg = _parse(files, upstream=up)
    assert cfg.upstream.certificate is not None
    with pytest.raises(ValueError, match="not an OpenSSH certificate"):
        _parse(files, upstream={**up, "certificate": f"{files['key']}.pub"})


SAFE = {"convert_attrs", "format_longname", "channel", "connection", "env", "logger", "_to_sftpname"}


def test_sftp_proxy_overrides_everything_that_touches_the_local_file_system() -> None:
    methods = {
        name
        for name, value in vars(asyncssh.SFTPServer).items()
        if not name.startswith("__") and (callable(value) or isinstance(value, property))
    }
    unknown = methods - OVERRIDDEN - SAFE
    assert not unknown, f"asyncssh.SFTPServer grew methods the proxy does not handle: {sorted(unknown)}"
    for name in OVERRIDDEN:
        assert name in vars(ProxySFTPServer), f"{name} is inherited: it would use the gateway's own files"
    assert not hasattr(ProxySFTPServer, "listdir")  # asyncssh would prefer it over scandir
    assert inspect.isasyncgenfunction(ProxySFTPServer.scandir)
