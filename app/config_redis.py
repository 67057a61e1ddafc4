"""iam's ``redis:`` block: the server, its login, and TLS to it.

Kept apart from :mod:`app.config` for size; :mod:`app.config` re-exports :class:`RedisConfig`.
"""

from __future__ import annotations

import os
import re
from typing import Literal
from urllib.parse import quote, urlencode, urlsplit

from pydantic import Field, model_validator
from redis.crc import key_slot

from app.config_model import ConfigModel
from app.config_text import mask_url

#: How the ``redis:`` block reaches Redis: one server, a Redis Cluster, or a master via Sentinel.
RedisMode = Literal["single", "cluster", "sentinel"]


class RedisConfig(ConfigModel):
    """iam's ``redis:`` block. ``host`` may carry a port (``127.0.0.1:6379``).

    As in iam: ``master-name`` set, ``addrs`` (else ``host``/``port``) are the sentinels watching
    that master; ``enable-cluster: true``, they are start-up nodes of a Redis Cluster; else one
    server (the first of ``addrs``, else ``host``/``port``). ``username``/``password`` log in to
    the server, the cluster's nodes, or the master (and its replicas): the sentinels are asked
    without a login, as iam's go-redis does.
    """

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
        if self.enable_cluster and self.master_name:
            raise ValueError(
                "enable-cluster and master-name: choose one (a Redis Cluster, or a master "
                "watched by Sentinel)"
            )
        mode = self.mode
        if mode == "cluster" and self.database != 0:
            raise ValueError(
                f"database: a Redis Cluster has only database 0 (got {self.database}); "
                "leave it out with enable-cluster: true"
            )
        if mode != "single" and self.use_ssl:
            which = "enable-cluster" if mode == "cluster" else "master-name"
            raise ValueError(f"use-ssl: TLS is supported with one server only, not with {which}")
        if mode == "single" and len(self.addrs) > 1:
            raise ValueError(
                "addrs: several addresses need enable-cluster: true (cluster nodes) or "
                "master-name (sentinels); for one server give one address"
            )
        key = "addrs" if self.addrs else "host"
        for text in self.addrs or (self.host,):
            port = _split_host_port(text, self.port)[1]
            if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
                raise ValueError(f"{key}: bad port in {text!r:.80}")
        # The address must make a URL that redis-py and kombu can read back.
        try:
            urlsplit(self.url).port  # noqa: B018 - parsing is the check
        except ValueError as exc:
            text = self.addrs[0] if self.addrs else self.host
            raise ValueError(f"{key}: {text!r:.80} makes no valid URL ({exc})") from None
        return self

    @property
    def mode(self) -> RedisMode:
        """``cluster`` (``enable-cluster``), ``sentinel`` (``master-name``) or ``single``."""
        if self.master_name:
            return "sentinel"
        return "cluster" if self.enable_cluster else "single"

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """Every (host, port) of ``addrs``, else ``host`` (with an optional port) and ``port``,
        as iam reads them: one server, the cluster's start-up nodes, or the sentinels."""
        texts = self.addrs or (self.host,)
        return tuple(_host_port(text, self.port) for text in texts)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) pair of the first address (the server, for one server)."""
        return self.addresses[0]

    def describe(self) -> str:
        """Where the ``redis:`` block points, for messages (no password)."""
        where = ",".join(f"{host}:{port}" for host, port in self.addresses)
        if self.mode == "cluster":
            return f"Redis Cluster via {where}"
        if self.mode == "sentinel":
            return f"master {self.master_name!r} of the sentinels {where}"
        return mask_url(self.url)

    @property
    def url(self) -> str:
        """A redis:// (or rediss://) URL for one server, usable by redis-py and kombu.

        Only for ``mode == "single"``: with a cluster or sentinels it is the first address's,
        which names no server of ours; build clients with :mod:`app.stores.clients`.
        """
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


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    name, port = _split_host_port(text, default_port)
    return name, int(port)


def _split_host_port(text: str, default_port: int) -> tuple[str, str]:
    # "host:port", or a bare host with the default port (an IPv6 address has several colons);
    # the port as written, for the validator to judge.
    if text.count(":") == 1:
        name, _, port = text.partition(":")
        return name, port
    return text, str(default_port)


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key``: the text of its first ``{...}`` if not empty,
    else the whole key."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def cluster_key_prefix(key_prefix: str, analytics_key: str) -> str:
    """Our key prefix on a Redis Cluster: every key of ours in the hash slot of iam's list.

    The purge trims the list and advances its offset in one script, which a cluster runs only
    when all its keys share a slot; the list's name is iam's, so our keys follow it. A prefix
    without a hash tag gets the list's in front (``{analytics-iam-system-analytics}iam-pump``);
    one with its own tag must land in the list's slot. Raises ``ValueError`` naming the key.
    """
    tag = hash_tag(analytics_key)
    prefixed = key_prefix if "{" in key_prefix else f"{{{tag}}}{key_prefix}"
    if key_slot(f"{prefixed}:x".encode()) != key_slot(analytics_key.encode()):
        if "{" in key_prefix:
            raise ValueError(
                f"key-prefix: on a Redis Cluster our keys must share the hash slot of "
                f"analytics-key; {key_prefix!r} does not: leave the braces out (iam-pump puts "
                f"{{{tag}}} in front) or use {{{tag}}}"
            )
        raise ValueError(
            f"analytics-key: {analytics_key!r} cannot be matched by a hash tag on a Redis "
            f"Cluster; give it one, like {{iam}}analytics"
        )
    return prefixed
