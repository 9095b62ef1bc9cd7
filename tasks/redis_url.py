"""Redis clients (and Celery's broker settings) from localq's one Redis URL, Sentinel included.

`LOCALQ_REDIS_URL` is `redis://`, `rediss://` (TLS), `unix://`, or, for a primary that Redis
Sentinel fails over to a replica, one URL naming the master and every sentinel:

    sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/DB]?master_name=NAME[&sentinel_password=P]

The password is the data nodes' (primary and replicas); `sentinel_password` is the sentinels'
own, if they ask for one. The port defaults to 26379. Every process builds its clients here, so
the job path, the event log, the data layer, the probes and the Celery broker all follow the same
primary: a client asks the sentinels for the primary's address on each new connection, and a
connection to a primary that went away (or came back as a replica) fails over to the new one.
While no primary is known (the failover window) a command raises redis-py's
`MasterNotFoundError`, a `ConnectionError`, which the API answers with a 503 like any outage.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelManagedConnection

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
#: Options that belong to the connections to the sentinels as well as to the data nodes.
_SENTINEL_SHARED = ("socket_timeout", "socket_connect_timeout")


@dataclass(frozen=True)
class SentinelTarget:
    """What a `sentinel://` URL names: where the sentinels are and which master to follow."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def is_sentinel(url: str) -> bool:
    return url.split(":", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The sentinels, master name, database and passwords of a `sentinel://` URL.

    Raises ValueError saying what is wrong; the message never repeats the URL (it may hold a password).
    """
    url = url.replace(f";{SENTINEL_SCHEME}://", ",")  # kombu's spelling: one URL per sentinel, ';' between
    parts = urlsplit(url)
    if parts.scheme.lower() != SENTINEL_SCHEME:
        raise ValueError("not a sentinel:// URL")
    credentials, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if credentials:
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = tuple(_address(item) for item in hosts.split(","))
    query = parse_qs(parts.query, keep_blank_values=True)
    master = query.get("master_name", query.get("service_name", [""]))[-1].strip()
    if not master:
        raise ValueError("a sentinel:// URL must name its master: ?master_name=NAME")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("a sentinel:// URL's path must be a database number")
    sentinel_password = query.get("sentinel_password", [""])[-1] or None
    return SentinelTarget(sentinels, master, int(path or 0), username, password, sentinel_password)


def _address(item: str) -> tuple[str, int]:
    host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
    host = host.strip("[]")
    if not host:
        raise ValueError("a sentinel:// URL names a sentinel without a host")
    if port and not port.isdigit():
        raise ValueError("a sentinel:// URL names a sentinel with an invalid port")
    return host, int(port or SENTINEL_PORT)


class FollowingConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks for the primary again whenever it reconnects.

    redis-py's own asks only when the pool opens it: one that breaks in the middle of a command
    (the primary died) is reconnected by the command's retries at the address it had, so a client
    riding over an outage with retries would knock at the dead primary until they run out.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        if self._sock:
            return None
        if retry_socket_connect:  # a reconnect by a command (connect_to passes False): find the primary
            return self.retry.call_with_retry(self._connect_retry, lambda error: None)
        return super().connect_check_health(check_health=check_health, retry_socket_connect=False)


def redis_client(url: str, **options) -> redis.Redis:
    """A client of the Redis `url` names; `options` are redis-py connection options.

    For `sentinel://`, a client of the current primary of the named master (see the module's text).
    """
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    sentinel_options = {key: options[key] for key in _SENTINEL_SHARED if key in options}
    if target.sentinel_password:
        sentinel_options["password"] = target.sentinel_password
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    credentials = {key: value for key, value in (("username", target.username), ("password", target.password))
                   if value is not None}
    return manager.master_for(target.master_name, db=target.db, connection_class=FollowingConnection,
                              **credentials, **options)


def broker_settings(url: str) -> tuple[str, dict, dict | None]:
    """(broker URL, extra transport options, `broker_use_ssl`) for Celery from localq's Redis URL.

    kombu spells Sentinel as one `sentinel://` URL per sentinel joined by ';', with the master's
    name and the sentinels' own password in the transport options. For `rediss://`, kombu reads the
    TLS settings from `broker_use_ssl`, not from the URL (and without them it would not check the
    server's certificate at all): the URL's `ssl_*` parameters move there, and the certificate is
    required, as redis-py requires it, unless the URL says `ssl_cert_reqs=none`.
    """
    if is_sentinel(url):
        target = parse_sentinel_url(url)
        auth = ""
        if target.password is not None or target.username is not None:
            auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
        hosts = [f"{SENTINEL_SCHEME}://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels]
        options: dict = {"master_name": target.master_name}
        if target.sentinel_password:
            options["sentinel_kwargs"] = {"password": target.sentinel_password}
        return ";".join(hosts), options, None
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss":
        return url, {}, None
    query = parse_qs(parts.query)
    use_ssl: dict = {"ssl_cert_reqs": _CERT_REQS.get(query.get("ssl_cert_reqs", ["required"])[-1].lower(),
                                                     ssl.CERT_REQUIRED)}
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(name):
            use_ssl[name] = query[name][-1]
    return parts._replace(query="").geturl(), {}, use_ssl


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def redacted(url: str) -> str:
    """`url` with its passwords replaced by `***`, for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        credentials, _, hosts = netloc.rpartition("@")
        user, has_secret, _ = credentials.partition(":")
        netloc = f"{user}:***@{hosts}" if has_secret else f"{user}@{hosts}"
    query = "&".join("sentinel_password=***" if item.startswith("sentinel_password=") else item
                     for item in parts.query.split("&")) if parts.query else ""
    return parts._replace(netloc=netloc, query=query).geturl()
