"""The Redis side: connecting (redis-py is an optional extra) and the Lua scripts that
make term changes and frame publication atomic on the server, so that a leader a newer
term has replaced can never add to the log (fencing)."""

from __future__ import annotations

import functools
from typing import Any

from ..errors import MissingDependencyError, ReplicationError

__all__ = ["connect", "Scripts", "redis_errors", "FENCED"]

FENCED = "MMSBFENCED"
"""Prefix of the error a script returns when the caller's term is no longer current."""


@functools.cache
def redis_errors() -> tuple[type[BaseException], ...]:
    """The errors of an unreachable or restarting server (retried with a backoff)."""
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError)


def connect(url: str, *, block: bool = False) -> Any:
    """A client for ``url`` (bytes in, bytes out). ``block``: for a connection that
    waits in XREAD BLOCK, with a longer socket timeout than any block it asks for.

    Raises:
        MissingDependencyError: redis-py is not installed.
        ReplicationError: the URL cannot be parsed.
    """
    try:
        import redis
    except ImportError:
        raise MissingDependencyError(
            "replication through Redis needs redis-py: pip install 'mmsb[replicate]'") from None
    try:
        return redis.Redis.from_url(url, socket_timeout=10.0 if block else 5.0,
                                    socket_connect_timeout=5.0, decode_responses=False)
    except ValueError as exc:
        raise ReplicationError(f"cannot use the Redis URL {url!r}: {exc}") from None


_CLAIM = """
-- A leader (re)starts: KEYS term, lease, terms, log:<current>;
-- ARGV node, ttl_ms, my_term (0: never took part), my_last_lsn, my_oldest_lsn.
-- Returns {new_term, start_lsn} or {-1, holder} (lease held) or {-2, current} (superseded)
-- or {-3, published} (the stream holds more of this term than this log: refused, since
-- followers may have acknowledged what this log lost).
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local lease = redis.call('GET', KEYS[2])
local mine = tonumber(ARGV[3])
if lease then
  local node = string.sub(lease, (string.find(lease, ':', 1, true) or 0) + 1)
  if node ~= ARGV[1] then return {-1, lease} end
end
if cur > 0 and (mine == 0 or cur > mine) then return {-2, tostring(cur)} end
local last = tonumber(ARGV[4])
local start = last + 1
if cur > 0 then
  local top = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
  if top[1] then
    local pub = tonumber(string.match(top[1][1], '^(%d+)'))
    if pub > last and mine == cur then return {-3, tostring(pub)} end
    if pub < last then start = pub + 1 end
  end
end
if start <= tonumber(ARGV[5]) then start = last + 1 end
local new = math.max(cur, mine) + 1
redis.call('SET', KEYS[1], new)
redis.call('SET', KEYS[2], new .. ':' .. ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[3], new, start)
return {new, start}
"""

_FENCE = """
-- A follower takes over: KEYS term, lease, terms; ARGV node, ttl_ms, followed_term, force.
-- Returns {new_term} or {-1, holder} or {-2, current}. Terms after the followed one that
-- never named their first LSN (a promotion that died half way) are passed over.
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local lease = redis.call('GET', KEYS[2])
if lease and ARGV[4] ~= '1' then return {-1, lease} end
local followed = tonumber(ARGV[3])
if cur < followed then return {-2, tostring(cur)} end
for t = followed + 1, cur do
  if redis.call('HEXISTS', KEYS[3], t) == 1 then return {-2, tostring(cur)} end
end
local new = cur + 1
redis.call('SET', KEYS[1], new)
redis.call('SET', KEYS[2], new .. ':' .. ARGV[1], 'PX', ARGV[2])
return {new}
"""

_START = """
-- The new leader names its first LSN: KEYS term, lease, terms; ARGV term, node, start, ttl.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] .. ':' .. ARGV[2] then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

_SHIP = """
-- Frames of one term: KEYS term, log:<term>, head; ARGV term, time_ns, n, id1, f1, ...
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('MMSBFENCED ' .. tostring(redis.call('GET', KEYS[1])))
end
local n = tonumber(ARGV[3])
local id
for i = 0, n - 1 do
  id = ARGV[4 + 2 * i]
  redis.call('XADD', KEYS[2], id, 'f', ARGV[5 + 2 * i])
end
if id then
  redis.call('HSET', KEYS[3], 'lsn', string.match(id, '^(%d+)'), 'term', ARGV[1],
             'time', ARGV[2])
end
return n
"""

_RENEW = """
-- KEYS term, lease; ARGV term, node, ttl_ms. 1: renewed; 0: fenced (another term).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local lease = redis.call('GET', KEYS[2])
if lease and lease ~= ARGV[1] .. ':' .. ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
return 1
"""

_RELEASE = """
-- KEYS lease; ARGV term, node.
if redis.call('GET', KEYS[1]) == ARGV[1] .. ':' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

_PUBLISH = """
-- A checkpoint's manifest, once its chunks are in: KEYS term, ckpts; ARGV term, lsn, manifest.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class Scripts:
    """The scripts registered on one client (redis-py loads them again after a server
    restart forgets them)."""

    def __init__(self, client: Any) -> None:
        self.claim = client.register_script(_CLAIM)
        self.fence = client.register_script(_FENCE)
        self.start = client.register_script(_START)
        self.ship = client.register_script(_SHIP)
        self.renew = client.register_script(_RENEW)
        self.release = client.register_script(_RELEASE)
        self.publish = client.register_script(_PUBLISH)
