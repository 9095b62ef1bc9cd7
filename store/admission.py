"""A fair share of the queue for batch work: lines are admitted into the shared Celery queues
project by project, so one project's huge batch cannot hold back another project's small one.

A batch's lines do not all go to the broker when it starts. They wait here in chunks (one
`localq.batch.lines` message each), and each device queue holds at most `limit` admitted chunks
at a time (`tasks.fair_share` sets it from the live workers' job slots). Whenever room opens
(a chunk finished, a batch started, the sweep ticked), chunks are admitted from the project that
has been served least while waiting: every waiting project has a *virtual time*, to which the
seconds of work of its admitted chunks are added (estimated at admission, corrected when they
finish). A project that starts waiting is put `lag` seconds ahead of the least-served waiting
project, whatever it used before: a newcomer is served first for at most `lag` seconds of work,
then the projects take turns; an idle project neither banks credit nor carries debt.
Within a project, its batches are served in the order they started. Interactive calls are not
admitted here at all: they keep their higher priority on the broker.

Everything is in Redis and moved by Lua scripts, so any number of workers on any number of
machines share one admission. Per queue `q` (prefix `localq:admission:<q>:`):

- `waiting`: zset, project -> virtual time, the projects with chunks waiting;
- `served`: hash, project -> virtual time (kept while the project is idle);
- `project:<p>`: list of the project's batch ids with chunks waiting, oldest first;
- `batch:<b>`: list of the batch's waiting chunks (JSON), in line order;
- `inflight`: zset, chunk token -> admission time; a token older than `stale` seconds is
  forgotten (its message was lost: the batch sweep sends such lines again);

and `localq:admission:queues:<b>`: the queues where batch `b` has chunks waiting (to discard them
when the batch ends early: expired, or failed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

PREFIX = "localq:admission:"
#: Chunks pushed per script call when a batch starts (a 50,000-line batch is many calls).
ENQUEUE_STEP = 200


def prefix(queue: str) -> str:
    return f"{PREFIX}{queue}:"


def batch_list(queue: str, batch_id: str) -> str:
    return f"{prefix(queue)}batch:{batch_id}"


def batch_queues(batch_id: str) -> str:
    return f"{PREFIX}queues:{batch_id}"


# KEYS: waiting, served, project list, batch list, batch queues. ARGV: project, batch id, lag, queue, chunk...
_ENQUEUE = """
redis.call('SADD', KEYS[5], ARGV[4])
local was = redis.call('LLEN', KEYS[4])
for i = 5, #ARGV do redis.call('RPUSH', KEYS[4], ARGV[i]) end
if was == 0 then redis.call('RPUSH', KEYS[3], ARGV[2]) end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local served = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  local lowest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if lowest[2] then served = tonumber(lowest[2]) - tonumber(ARGV[3]) end
  redis.call('HSET', KEYS[2], ARGV[1], tostring(served))
  redis.call('ZADD', KEYS[1], served, ARGV[1])
end
return was
"""

# KEYS: waiting, served, inflight. ARGV: queue prefix, limit, now, stale.
# Admits chunks while the queue has room, least-served project first; returns them (JSON).
_ADMIT = """
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[4]))
local room = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[3])
local admitted = {}
while room > 0 do
  local top = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #top == 0 then break end
  local project = top[1]
  local projects = ARGV[1] .. 'project:' .. project
  local batch = redis.call('LINDEX', projects, 0)
  if not batch then
    redis.call('ZREM', KEYS[1], project)
  else
    local chunks = ARGV[1] .. 'batch:' .. batch
    local chunk = redis.call('LPOP', chunks)
    if redis.call('LLEN', chunks) == 0 then redis.call('LPOP', projects) end
    if chunk then
      local fields = cjson.decode(chunk)
      redis.call('HINCRBYFLOAT', KEYS[2], project, fields['cost'])
      if redis.call('LLEN', projects) == 0 then
        redis.call('ZREM', KEYS[1], project)
      else
        redis.call('ZINCRBY', KEYS[1], fields['cost'], project)
      end
      redis.call('ZADD', KEYS[3], now, fields['token'])
      admitted[#admitted + 1] = chunk
      room = room - 1
    elseif redis.call('LLEN', projects) == 0 then
      redis.call('ZREM', KEYS[1], project)
    end
  end
end
return admitted
"""

# KEYS: waiting, batch list, project list. ARGV: project, batch id. Drops the batch's waiting chunks.
_DISCARD = """
local dropped = redis.call('LLEN', KEYS[2])
redis.call('DEL', KEYS[2])
redis.call('LREM', KEYS[3], 0, ARGV[2])
if redis.call('LLEN', KEYS[3]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) end
return dropped
"""

# KEYS: waiting, served, inflight. ARGV: token, project, correction (actual - estimated seconds).
# Returns 1 the first time a chunk is finished (a redelivered chunk changes nothing).
_FINISH = """
if redis.call('ZREM', KEYS[3], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[2], ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then redis.call('ZINCRBY', KEYS[1], ARGV[3], ARGV[2]) end
return 1
"""


@dataclass(frozen=True)
class Chunk:
    """One lines message waiting for (or given) its turn."""

    token: str  # unique per chunk: `<batch id>:<first line>`
    batch_id: str
    project: str
    queue: str
    cost: float  # estimated seconds of work
    items: list  # [line, custom_id, body] each

    def encode(self) -> str:
        return json.dumps({"token": self.token, "batch_id": self.batch_id, "project": self.project,
                           "queue": self.queue, "cost": self.cost, "items": self.items}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> Chunk:
        return cls(**json.loads(raw))


class Admission:
    def __init__(self, client: redis.Redis, *, lag: float = 30.0, stale: float = 3600.0):
        self.client = client
        self.lag = lag
        self.stale = stale
        self._enqueue = client.register_script(_ENQUEUE)
        self._admit = client.register_script(_ADMIT)
        self._finish = client.register_script(_FINISH)
        self._discard = client.register_script(_DISCARD)

    def _keys(self, queue: str) -> list[str]:
        base = prefix(queue)
        return [base + "waiting", base + "served", base + "inflight"]

    def enqueue(self, chunks: list[Chunk]) -> None:
        """Put a batch's chunks (all of one project, in line order) in line for their queues."""
        by_queue: dict[str, list[Chunk]] = {}
        for chunk in chunks:
            by_queue.setdefault(chunk.queue, []).append(chunk)
        for queue, queued in by_queue.items():
            waiting, served, _ = self._keys(queue)
            first = queued[0]
            for start in range(0, len(queued), ENQUEUE_STEP):
                step = queued[start:start + ENQUEUE_STEP]
                self._enqueue(keys=[waiting, served, f"{prefix(queue)}project:{first.project}",
                                    batch_list(queue, first.batch_id), batch_queues(first.batch_id)],
                              args=[first.project, first.batch_id, self.lag, queue,
                                    *(chunk.encode() for chunk in step)])

    def discard(self, batch_id: str, project: str) -> int:
        """Forget the batch's waiting chunks (it ended: expired, cancelled, failed); how many."""
        dropped = 0
        for raw in self.client.smembers(batch_queues(batch_id)):
            queue = raw.decode() if isinstance(raw, bytes) else raw
            dropped += int(self._discard(keys=[self._keys(queue)[0], batch_list(queue, batch_id),
                                               f"{prefix(queue)}project:{project}"], args=[project, batch_id]))
        self.client.delete(batch_queues(batch_id))
        return dropped

    def admit(self, queue: str, limit: int, now: float) -> list[Chunk]:
        """The chunks that may go to `queue`'s broker list now (the caller sends them)."""
        raw = self._admit(keys=self._keys(queue), args=[prefix(queue), limit, now, self.stale])
        return [Chunk.decode(item) for item in raw]

    def finish(self, chunk_token: str, queue: str, project: str, correction: float) -> bool:
        """A chunk ran (or was given up): free its room and charge its project what it really cost."""
        return bool(self._finish(keys=self._keys(queue), args=[chunk_token, project, correction]))

    def waiting_queues(self, queues: list[str]) -> list[str]:
        """Those of `queues` with projects waiting to be admitted, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(self._keys(queue)[0])
        return [queue for queue, waiting in zip(queues, pipe.execute(), strict=True) if waiting]

    def waiting_chunks(self, batch_id: str, queues: list[str]) -> int:
        """How many of the batch's chunks still wait on `queues`."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(batch_list(queue, batch_id))
        return sum(pipe.execute())

    def in_flight(self, queue: str) -> int:
        return int(self.client.zcard(self._keys(queue)[2]))

    def admitted(self, queue: str, before: float) -> list[str]:
        """Tokens of the chunks admitted to `queue` before `before` and not finished yet."""
        found = self.client.zrangebyscore(self._keys(queue)[2], "-inf", before)
        return [token.decode() if isinstance(token, bytes) else token for token in found]

    def forget(self, queue: str, tokens: list[str]) -> int:
        """Give back the room of chunks whose messages were lost (their lines are sent again by the
        batch sweep); how many were still in flight."""
        return int(self.client.zrem(self._keys(queue)[2], *tokens)) if tokens else 0

    def virtual_time(self, queue: str, project: str) -> float:
        return float(self.client.hget(self._keys(queue)[1], project) or 0)
