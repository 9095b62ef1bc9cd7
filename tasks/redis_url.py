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

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

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
    return manager.master_for(target.master_name, db=target.db, **credentials, **options)


def broker_settings(url: str) -> tuple[str, dict]:
    """(broker URL, extra transport options) for Celery from localq's Redis URL.

    kombu spells Sentinel as one `sentinel://` URL per sentinel joined by ';', with the master's
    name and the sentinels' own password in the transport options.
    """
    if not is_sentinel(url):
        return url, {}
    target = parse_sentinel_url(url)
    auth = ""
    if target.password is not None or target.username is not None:
        from urllib.parse import quote

        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    hosts = [f"{SENTINEL_SCHEME}://{auth}{host}:{port}/{target.db}" for host, port in target.sentinels]
    options: dict = {"master_name": target.master_name}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return ";".join(hosts), options


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
