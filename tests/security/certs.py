"""Certificates made for a test with the openssl command: a CA, a server certificate for
127.0.0.1 / localhost, a client certificate, and an unrelated CA."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require

DAYS = "2"


@dataclass(frozen=True)
class Certs:
    """PEM files: the CA, the server's and the client's pairs, and a CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS, "-subj",
        f"/CN={name}", "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions + "\n", encoding="utf-8")
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", DAYS, "-extfile", str(ext_file), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def make_certs(directory: Path) -> Certs:
    """Make every file under ``directory`` (about a second of RSA key generation)."""
    require(shutil.which("openssl") is not None, "the openssl command")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    server = _signed(
        directory,
        "redis-server",
        ca,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
    )
    client = _signed(directory, "iam-pump-client", ca, "extendedKeyUsage=clientAuth")
    other_ca, _ = _ca(directory, "other-ca")
    return Certs(ca[0], server[0], server[1], client[0], client[1], other_ca)
