"""Every Redis client scls opens is made here, from ``SCLS_REDIS_URL``.

Two kinds of URL are accepted:

* anything ``redis.Redis.from_url`` takes (``redis://``, ``rediss://``, ``unix://``);
* a Redis Sentinel URL, for a primary with replicas managed by Sentinel::

      redis+sentinel://[[user]:password@]host1:26379[,host2:26379,...]/<service>[/<db>]
          [?sentinel_password=...]

  ``host:port`` pairs are the *sentinels* (port 26379 when left out); ``<service>`` is the
  name the sentinels monitor (``sentinel monitor <service> ...``); ``<db>`` defaults to 0.
  The user and password authenticate to the Redis primary (``requirepass`` / ACL);
  ``sentinel_password`` authenticates to the sentinels and is sent only when given (a
  sentinel without a password rejects AUTH).

A Sentinel client asks the sentinels for the current primary each time it opens a
connection (redis-py's ``SentinelConnectionPool``), so a new connection reaches the primary
of the moment. A connection that was open before a failover may still talk to the old
primary: when that server refuses a write (``READONLY``: it has been demoted to a replica;
``NOREPLICAS``: it lost its replicas, with ``min-replicas-to-write`` set as in
``deploy/k8s/overlays/redis-sentinel``), the connection is dropped and the command is
retried, with a short back-off, on the primary Sentinel names then (:class:`PrimaryMovedError`).
The refused command wrote nothing (Redis checks before a script's first write), so the
retry cannot apply it twice. Other connection errors are not retried, as with plain URLs.
What survives a failover is in docs/operations.md ("Redis Sentinel").
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.retry as aretry
import redis.asyncio.sentinel as asentinel
import redis.retry as sretry
import redis.sentinel as ssentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ReadOnlyError, ResponseError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# Sentinels answer at once or not at all: a blackholed sentinel must not stall a connect
# for the default (unbounded) socket timeout before the next sentinel is asked.
_SENTINEL_TIMEOUT_S = 2.0
_QUERY_OPTIONS = frozenset({"sentinel_password"})
# A write refused by a server that is no longer a usable primary. Plain, or inside a script's
# error text ("... @user_script: 1: -NOREPLICAS Not enough good replicas to write.").
_REFUSED = re.compile(r"(?:^|-)(?:READONLY|NOREPLICAS) ")
# Sentinel names the new primary ~1 s after the old one lost its replica (promotion, then
# +switch-master), so the retries span ~3.5 s: 0.1, 0.2, 0.4, 0.8, 1, 1.
_RETRIES = 6
_BACKOFF = (1.0, 0.1)  # cap, base (s)
# Every client's retry policy is set here, never left to redis-py's default: that default
# changed under us (redis-py 8.2 retries ten times, timeouts included, so one call to a hung
# server took 27 s where its socket timeout said 2, and a worker ignored SIGTERM that long).
# A dropped connection (a restarted server, an idle connection it closed) is retried twice on
# a fresh one, quickly; a timeout is not retried: the server is not answering, and the
# caller's bound is the timeout it set.
_RECONNECTS = 2
_RECONNECT_BACKOFF = (0.5, 0.05)  # cap, base (s)


def _sync_retry() -> sretry.Retry:
    return sretry.Retry(ExponentialBackoff(*_RECONNECT_BACKOFF), _RECONNECTS,
                        supported_errors=(redis.ConnectionError,))


def _async_retry() -> aretry.Retry:
    return aretry.Retry(ExponentialBackoff(*_RECONNECT_BACKOFF), _RECONNECTS,
                        supported_errors=(redis.ConnectionError,))


class PrimaryMovedError(redis.ConnectionError):
    """The server a Sentinel client took for the primary refused a write; the connection
    was dropped and the next attempt asks Sentinel again."""


def _refused_write(exc: ResponseError) -> bool:
    return isinstance(exc, ReadOnlyError) or bool(_REFUSED.search(str(exc)))


def _moved(exc: ResponseError) -> PrimaryMovedError:
    return PrimaryMovedError(f"the primary refused a write ({exc}); asking Sentinel again")


class _SyncConnection(ssentinel.SentinelManagedConnection):
    """redis-py's Sentinel connection, which also treats NOREPLICAS and a write refused
    inside a script as "the primary moved" (redis-py only recognises a plain READONLY)."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """Read a reply; a refused write drops the connection (see the module docstring)."""
        try:
            return super(ssentinel.SentinelManagedConnection, self).read_response(
                *args, **kwargs)
        except ResponseError as exc:
            if not _refused_write(exc):
                raise
            self.disconnect()
            # redis-py reconnects a dropped connection to its last host (only a fresh one
            # asks Sentinel), so point it at the primary Sentinel names now.
            with contextlib.suppress(redis.ConnectionError):  # no sentinel: retry as is
                self.host, self.port = self.connection_pool.get_master_address()
            raise _moved(exc) from exc


class _AsyncConnection(asentinel.SentinelManagedConnection):
    """The asyncio twin of :class:`_SyncConnection`."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        """Read a reply; a refused write drops the connection (see the module docstring)."""
        try:
            return await super(asentinel.SentinelManagedConnection, self).read_response(
                *args, **kwargs)
        except ResponseError as exc:
            if not _refused_write(exc):
                raise
            await self.disconnect()
            with contextlib.suppress(redis.ConnectionError):  # see _SyncConnection
                self.host, self.port = await self.connection_pool.get_master_address()
            raise _moved(exc) from exc


@dataclass(frozen=True)
class SentinelTarget:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def sentinel_kwargs(self, retry: sretry.Retry | aretry.Retry) -> dict[str, Any]:
        """Connection arguments for the sentinels themselves (``retry``: the policy of the
        client kind, sync or async, that asks them)."""
        kwargs: dict[str, Any] = {"socket_timeout": _SENTINEL_TIMEOUT_S,
                                  "socket_connect_timeout": _SENTINEL_TIMEOUT_S, "retry": retry}
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def primary_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the primary (db and credentials)."""
        return {"db": self.db, "username": self.username, "password": self.password}


def is_sentinel_url(url: str) -> bool:
    """True for a ``redis+sentinel://`` URL."""
    return url.lower().startswith(f"{SENTINEL_SCHEME}://")


def _parse_host(item: str, url: str) -> tuple[str, int]:
    host, sep, port = item.strip().rpartition(":")
    if not sep:  # no port given
        host, port = port, str(SENTINEL_PORT)
    host = host.strip("[]")  # IPv6 literals: [::1]:26379
    if not host or not port.isdigit():
        raise ValueError(f"bad sentinel address {item!r} in {redact(url)}; "
                         "expected host:port, e.g. redis-sentinel:26379")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse a ``redis+sentinel://`` URL (see the module docstring).

    Raises:
        ValueError: not a sentinel URL, no sentinel, no service name, a bad db number or an
            unknown query option; the message shows the expected form.
    """
    if not is_sentinel_url(url):
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL: {redact(url)}")
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = tuple(_parse_host(h, url) for h in hosts.split(",") if h.strip())
    path = [unquote(p) for p in parts.path.split("/") if p]
    form = f"{SENTINEL_SCHEME}://[:password@]host1:26379,host2:26379/<service>/<db>"
    if not sentinels or not path or len(path) > 2:
        raise ValueError(f"bad sentinel URL {redact(url)}; expected {form}")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"bad db {path[1]!r} in {redact(url)}; expected {form}")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - _QUERY_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {redact(url)}; "
                         f"known: {sorted(_QUERY_OPTIONS)}")
    return SentinelTarget(
        sentinels=sentinels, service=path[0], db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None, password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password", [None])[-1])


def redact(url: str) -> str:
    """``url`` without its password (for logs and error messages)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}", query="").geturl()


def describe(url: str) -> str:
    """Where ``url`` points, without credentials: ``host:port`` of a plain URL,
    ``sentinel <service> via host:port,...`` of a Sentinel URL."""
    if is_sentinel_url(url):
        target = parse_sentinel_url(url)
        via = ",".join(f"{h}:{p}" for h, p in target.sentinels)
        return f"sentinel service {target.service} via {via}"
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def sync_client(url: str, *, single_connection_client: bool = False,
                **connection_kwargs: Any) -> redis.Redis:
    """A synchronous client for ``url`` (plain or Sentinel). ``connection_kwargs`` go to
    every connection (``decode_responses``, ``socket_timeout``, ``health_check_interval``...)."""
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, single_connection_client=single_connection_client,
                                    retry=_sync_retry(), **connection_kwargs)
    target = parse_sentinel_url(url)
    sentinel = ssentinel.Sentinel(list(target.sentinels),
                                  sentinel_kwargs=target.sentinel_kwargs(_sync_retry()))
    retry = sretry.Retry(ExponentialBackoff(*_BACKOFF), _RETRIES,
                         supported_errors=(PrimaryMovedError,))
    pool = ssentinel.SentinelConnectionPool(
        target.service, sentinel, connection_class=_SyncConnection, retry=retry,
        **target.primary_kwargs(), **connection_kwargs)
    client = redis.Redis(connection_pool=pool, single_connection_client=single_connection_client)
    client.auto_close_connection_pool = True  # the client owns the pool, as from_url's does
    return client


def probe_client(url: str, timeout_s: float, **connection_kwargs: Any) -> redis.Redis:
    """A client for a probe that loops by itself (is the server up yet?): each call is one
    try, bounded by ``timeout_s``, with no retry inside it."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=sretry.Retry(NoBackoff(), 0), **connection_kwargs)


def rq_connection(url: str) -> redis.Redis:
    """The connection RQ needs: raw bytes (RQ pickles jobs; ``decode_responses`` must be
    off)."""
    return sync_client(url, decode_responses=False)


class _SentinelPool(asentinel.SentinelConnectionPool):
    """redis-py's async Sentinel pool that also closes its sentinel clients when closed
    (their open connections would otherwise be left to the garbage collector)."""

    async def aclose(self) -> None:
        """Close the pool's connections, then the connections to the sentinels."""
        await super().aclose()
        await self.sentinel_manager.aclose()


class _BlockingSentinelPool(_SentinelPool, aioredis.BlockingConnectionPool):
    """Sentinel's primary lookup with the blocking pool's wait for a free connection."""


def async_client(url: str, *, single_connection_client: bool = False, reconnect: bool = True,
                 **connection_kwargs: Any) -> aioredis.Redis:
    """A ``redis.asyncio`` client for ``url`` (plain or Sentinel); create it on the event
    loop that uses it. ``reconnect=False``: a dropped connection raises at once instead of
    being retried on a fresh one, for a caller that must know (a blocked reader whose
    connection id others use to wake it)."""
    if not is_sentinel_url(url):
        retry = _async_retry() if reconnect else aretry.Retry(NoBackoff(), 0)
        return aioredis.Redis.from_url(url, single_connection_client=single_connection_client,
                                       retry=retry, **connection_kwargs)
    pool = _async_sentinel_pool(url, _SentinelPool, connection_kwargs)
    return _async_owner(pool, single_connection_client)


def async_blocking_client(url: str, *, max_connections: int, timeout: float,
                          **connection_kwargs: Any) -> aioredis.Redis:
    """A ``redis.asyncio`` client on a blocking pool: at most ``max_connections``, and a
    caller waits up to ``timeout`` seconds for a free one instead of failing."""
    kwargs = {"max_connections": max_connections, "timeout": timeout, **connection_kwargs}
    if not is_sentinel_url(url):
        # A pooled connection left over from before a Redis restart fails its next command:
        # it is retried on a fresh one (_async_retry). Two quick tries: a Redis that is really
        # down still fails fast (503).
        pool = aioredis.BlockingConnectionPool.from_url(url, retry=_async_retry(), **kwargs)
    else:
        pool = _async_sentinel_pool(url, _BlockingSentinelPool, kwargs)
    return aioredis.Redis.from_pool(pool)


def _async_sentinel_pool(url: str, pool_class: type[_SentinelPool],
                         connection_kwargs: dict[str, Any]) -> _SentinelPool:
    target = parse_sentinel_url(url)
    sentinel = asentinel.Sentinel(list(target.sentinels),
                                  sentinel_kwargs=target.sentinel_kwargs(_async_retry()))
    retry = aretry.Retry(ExponentialBackoff(*_BACKOFF), _RETRIES,
                         supported_errors=(PrimaryMovedError,))
    return pool_class(target.service, sentinel, connection_class=_AsyncConnection, retry=retry,
                      **target.primary_kwargs(), **connection_kwargs)


def _async_owner(pool: aioredis.ConnectionPool, single: bool) -> aioredis.Redis:
    client = aioredis.Redis(connection_pool=pool, single_connection_client=single)
    client.auto_close_connection_pool = True  # aclose() closes the pool, as from_url's does
    return client


#: Socket (and connect) timeout of the scheduler's and workers' calls (redis-py's default:
#: none): every scls call is one short script or pipeline, so a Redis that has not answered
#: in 2 s is treated as unreachable, and loops (and a SIGTERM) are never blocked for long.
CALL_TIMEOUT_S = 2.0


def bound_timeouts(client: redis.Redis, timeout_s: float) -> redis.Redis:
    """Give a client's future connections socket and connect timeouts (plain and Sentinel
    pools alike): a stopped or partitioned Redis then raises ``TimeoutError`` instead of
    blocking the caller forever."""
    client.connection_pool.connection_kwargs.update(
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    return client
