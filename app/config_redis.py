"""iam's ``redis:`` block: the server, its login, and TLS to it.

Kept apart from :mod:`app.config` for size; :mod:`app.config` re-exports :class:`RedisConfig`.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, urlencode, urlsplit

from pydantic import Field, model_validator

from app.config_model import ConfigModel


class RedisConfig(ConfigModel):
    """iam's ``redis:`` block. ``host`` may carry a port (``127.0.0.1:6379``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    addrs: tuple[str, ...] = ()
    username: str = ""
    password: str = ""
    database: int = Field(default=0, ge=0)
    master_name: str = ""
    optimisation_max_idle: int = Field(default=2000, ge=0)
    optimisation_max_active: int = Field(default=4000, ge=0)
    timeout: float = Field(default=0, ge=0)
    enable_cluster: bool = False
    use_ssl: bool = False
    ssl_insecure_skip_verify: bool = False
    #: PEM file of the CA(s) that signed the server's certificate (else the system's CAs).
    ssl_ca_file: str = ""
    #: A client certificate and its key (PEM), for a server that asks for one (mutual TLS).
    ssl_cert_file: str = ""
    ssl_key_file: str = ""

    @model_validator(mode="after")
    def _tls_files(self) -> RedisConfig:
        given = {
            name: path
            for name, path in (
                ("ssl-ca-file", self.ssl_ca_file),
                ("ssl-cert-file", self.ssl_cert_file),
                ("ssl-key-file", self.ssl_key_file),
            )
            if path
        }
        if given and not self.use_ssl:
            raise ValueError(f"{', '.join(given)}: only used with use-ssl: true")
        if bool(self.ssl_cert_file) != bool(self.ssl_key_file):
            raise ValueError("ssl-cert-file and ssl-key-file go together (mutual TLS)")
        for name, path in given.items():
            if not os.access(path, os.R_OK) or not os.path.isfile(path):
                raise ValueError(f"{name}: cannot read {path!r}")
        return self

    @model_validator(mode="after")
    def _supported(self) -> RedisConfig:
        if self.enable_cluster:
            raise ValueError(
                "enable-cluster: Redis Cluster is not supported; point host at one node"
            )
        if self.master_name:
            raise ValueError("master-name: Redis Sentinel is not supported; use broker-url")
        if len(self.addrs) > 1:
            raise ValueError("addrs: only one address is supported")
        # The address must make a URL that redis-py and kombu can read back.
        key, text = ("addrs", self.addrs[0]) if self.addrs else ("host", self.host)
        port = text.partition(":")[2] if text.count(":") == 1 else str(self.port)
        if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
            raise ValueError(f"{key}: bad port in {text!r:.80}")
        try:
            urlsplit(self.url).port  # noqa: B018 - parsing is the check
        except ValueError as exc:
            raise ValueError(f"{key}: {text!r:.80} makes no valid URL ({exc})") from None
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) pair, from ``addrs``, or from ``host`` with an optional port."""
        text = self.addrs[0] if self.addrs else self.host
        if text.count(":") == 1:
            name, _, port = text.partition(":")
            return name, int(port)
        return text, self.port

    @property
    def url(self) -> str:
        """A redis:// (or rediss://) URL for this server, usable by redis-py and kombu."""
        host, port = self.address
        scheme = "rediss" if self.use_ssl else "redis"
        auth = ""
        if self.password:
            auth = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}@"
        url = f"{scheme}://{auth}{host}:{port}/{self.database}"
        if self.use_ssl:
            url += "?" + urlencode(self.tls_options, quote_via=quote)
        return url

    @property
    def tls_options(self) -> dict[str, str]:
        """TLS settings as the URL query both redis-py and kombu read (kombu's own default
        for a bare ``rediss://`` URL is not to verify, so ``ssl_cert_reqs`` is always named)."""
        skip = self.ssl_insecure_skip_verify
        options = {"ssl_cert_reqs": "none" if skip else "required"}
        for name, path in (
            ("ssl_ca_certs", "" if skip else self.ssl_ca_file),
            ("ssl_certfile", self.ssl_cert_file),
            ("ssl_keyfile", self.ssl_key_file),
        ):
            if path:
                options[name] = os.path.abspath(path)
        return options
