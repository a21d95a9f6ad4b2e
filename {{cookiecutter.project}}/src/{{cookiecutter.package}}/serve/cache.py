"""An optional Redis cache of deterministic results (greedy or seeded generations, embeddings).

Off unless `server.cache_url=redis://host:port/db` is set. Keys hash the route, the model (the
checkpoint's path, size and modification time) and the request with its defaults filled in. A
Redis that is down, slow or gone is logged and counted (serve_cache_lookups{result="error"}), then
left alone for `retry_s` seconds: requests are answered by the model meanwhile, never failed.
"""

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .metrics import Metrics

log = logging.getLogger(__name__)


def model_fingerprint(ckpt_path: str) -> str:
    """Changes when the checkpoint file is replaced, so a new model never reads old answers."""
    stat = Path(ckpt_path).resolve().stat()
    return f"{Path(ckpt_path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class ResultCache:
    def __init__(
        self, url: str, fingerprint: str, metrics: Metrics, ttl_s: int, timeout_s: float, retry_s: float
    ) -> None:
        # Imported here: redis is only needed when the cache is on.
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        try:
            self.client = Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
            )
        except ValueError as e:
            raise ConfigError(f"server.cache_url={url!r}: {e} (expected redis://host:port/db)") from None
        self.url, self.fingerprint, self.metrics = url, fingerprint, metrics
        self.ttl_s, self.retry_s = ttl_s, retry_s
        self._down_until = 0.0  # monotonic time before which Redis is not tried again

    def key(self, route: str, request: dict[str, Any]) -> str:
        payload = json.dumps([route, self.fingerprint, request], sort_keys=True, ensure_ascii=False)
        return f"serve:{route.strip('/')}:{hashlib.sha256(payload.encode()).hexdigest()}"

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, action: str, error: Exception) -> None:
        if self.available():  # log once per outage, not once per request
            log.warning(
                "Redis at %s failed on %s (%s: %s); serving without the cache for %g s",
                self.url, action, type(error).__name__, error, self.retry_s,
            )  # fmt: skip
        self._down_until = time.monotonic() + self.retry_s

    async def get(self, route: str, key: str) -> dict[str, Any] | None:
        from redis.exceptions import RedisError

        if not self.available():
            self.metrics.cache.labels(route, "error").inc()
            return None
        try:
            raw = await self.client.get(key)
        except (RedisError, OSError) as e:
            self._failed("get", e)
            self.metrics.cache.labels(route, "error").inc()
            return None
        self.metrics.cache.labels(route, "hit" if raw is not None else "miss").inc()
        return json.loads(raw) if raw is not None else None

    async def set(self, key: str, value: dict[str, Any]) -> None:
        from redis.exceptions import RedisError

        if not self.available():
            return
        try:
            await self.client.set(key, json.dumps(value), ex=self.ttl_s)
        except (RedisError, OSError) as e:
            self._failed("set", e)

    async def status(self) -> str:
        """'ok' or 'unavailable', for /health (a ping, bounded by the socket timeout)."""
        from redis.exceptions import RedisError

        try:
            await self.client.ping()
        except (RedisError, OSError) as e:
            self._failed("ping", e)
            return "unavailable"
        self._down_until = 0.0
        return "ok"

    async def close(self) -> None:
        await self.client.aclose()
