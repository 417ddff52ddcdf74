"""The project's one retry policy for storage reads and writes: transient errors (a throttled or
timed-out S3 or GCS request, a dropped connection, a 5xx, a server briefly down) are retried with
exponential backoff and full jitter; permanent ones (no such file, access denied, corrupt bytes)
are not, and the caller skips the record with its reason or fails, as before.

Two layers, on purpose. botocore retries each S3 request itself (`BOTOCORE_RETRIES`, set through
`storage.storage_options`), which absorbs single 5xx and throttling answers cheaply; gcsfs does the
same for each GCS request (6 tries, waits of about 1, 2, 4, 8 and 16 s, fixed inside gcsfs). What
survives that (a server down for longer) reaches `call` or `retry_failed` here, whose backoff spans
at most 51.5 s in all before a record is given up. gcsfs's tries cannot be lowered per filesystem,
so on GCS the two layers together wait up to about 5.5 minutes (8 x ~35 s + 51.5 s) for a record.
"""

from __future__ import annotations

import errno
import logging
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

# botocore's own per-request retries ("standard" mode: 5xx, throttling, connection errors, with
# exponential backoff and jitter); `max_attempts` counts the first try. Few: its waits multiply
# with ours, and a wrong endpoint should fail in about a minute, not after many.
BOTOCORE_RETRIES = {"max_attempts": 4, "mode": "standard"}

# Errors a retry cannot fix: the object is absent or forbidden, its bytes are wrong, or the call
# itself is (bad arguments, an operation this filesystem does not offer), which a retry repeats.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
    ValueError, TypeError, KeyError, NotImplementedError,
)
# errno values of an OSError that mean the same (s3fs raises OSError(EACCES...) for some codes).
PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
                              errno.EINVAL, errno.ENAMETOOLONG})

# The HTTP errors of the GCS stack, as (module, class, attribute holding the status): gcsfs's own,
# aiohttp's (gcsfs talks through it) and google-api-core's. Looked up in `sys.modules`, not
# imported: an error of a library that was never imported cannot occur, and importing the Google
# stack costs every process that only reads local files a second.
HTTP_ERRORS = (("gcsfs.retry", "HttpError", "code"),
               ("aiohttp.client_exceptions", "ClientResponseError", "status"),
               ("google.api_core.exceptions", "GoogleAPICallError", "code"))
# The 4xx answers that mean "try again later": request timeout, too many requests. Every other 4xx
# (bad request, unauthorized, forbidden, not found, precondition failed...) repeats on a retry;
# every 5xx is the server's passing trouble.
TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})


def _loaded_class(module: str, name: str) -> type | None:
    return getattr(sys.modules.get(module), name, None)


def http_status(error: BaseException) -> int | None:
    """The HTTP status a GCS-stack error carries, or None for any other error."""
    for module, name, attribute in HTTP_ERRORS:
        kind = _loaded_class(module, name)
        if kind is not None and isinstance(error, kind):
            status = getattr(error, attribute, None)
            if isinstance(status, str) and status.isdigit():
                status = int(status)
            return status if isinstance(status, int) else None
    return None


def is_transient(error: BaseException) -> bool:
    """Whether retrying the same request may succeed.

    Everything that is not known to be permanent counts as transient: an unknown error costs a few
    retries; a transient one wrongly called permanent loses the record."""
    if isinstance(error, PERMANENT_ERRORS):
        return False
    if isinstance(error, OSError) and error.errno in PERMANENT_ERRNOS:
        return False
    # gcsfs answers a 403 with a bare OSError("Forbidden: <path>...") that has no errno
    # (`validate_response` in fsspec/gcsfs, gcsfs/retry.py).
    if isinstance(error, OSError) and error.errno is None and str(error).startswith("Forbidden"):
        return False
    # No usable Google credentials at all (none found, or a malformed key file): a configuration
    # error. Other auth errors (a token refresh that timed out at the metadata server) may pass.
    no_credentials = _loaded_class("google.auth.exceptions", "DefaultCredentialsError")
    if no_credentials is not None and isinstance(error, no_credentials):
        return False
    status = http_status(error)
    if status is not None and 400 <= status < 500:
        return status in TRANSIENT_CLIENT_STATUSES
    return isinstance(error, Exception)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and backoff: try `attempts` times; before try n+1 sleep a uniform random time in
    [0, min(max_delay, base_delay * 2**n)] ("full jitter": many workers retrying at once spread out
    instead of hitting a recovering server together). The defaults wait at most 51.5 s in all
    (`longest_wait`): 0.5 + 1 + 2 + 4 + 8 + 16 + 20."""

    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0 = the first retry)."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** retry)))

    def longest_wait(self) -> float:
        """The most this policy can sleep over all its retries."""
        return sum(min(self.max_delay, self.base_delay * (2 ** retry)) for retry in range(self.attempts - 1))


DEFAULT_POLICY = RetryPolicy()


def call(function: Callable[[], Result], what: str, policy: RetryPolicy = DEFAULT_POLICY,
         sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> Result:
    """`function()`, retried on transient errors; the last error (or a permanent one) is raised."""
    rng = rng or random.Random()
    for attempt in range(policy.attempts):
        try:
            return function()
        except Exception as error:
            if not is_transient(error) or attempt == policy.attempts - 1:
                raise
            wait = policy.delay(attempt, rng)
            logger.warning("%s: %s: %s; retry %d of %d in %.1f s", what, type(error).__name__, error,
                           attempt + 1, policy.attempts - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def retry_failed(keys: Sequence[str], results: list[Result | Exception],
                 fetch: Callable[[list[str]], list[Result | Exception]],
                 policy: RetryPolicy = DEFAULT_POLICY, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> tuple[list[Result | Exception], int]:
    """Batched retries: `results[i]` is `keys[i]`'s result or the error reading it raised; the
    transiently failed keys are fetched again together (one wait per round, not one per key) until
    they succeed, fail permanently or the policy's attempts are spent. Returns the results and how
    many retried reads there were."""
    rng = rng or random.Random()
    results = list(results)
    retried = 0
    for attempt in range(policy.attempts - 1):
        pending = [index for index, result in enumerate(results)
                   if isinstance(result, Exception) and is_transient(result)]
        if not pending:
            break
        wait = policy.delay(attempt, rng)
        example = results[pending[0]]
        logger.warning("%d reads failed (%s: %s, ...); retry %d of %d in %.1f s", len(pending),
                       type(example).__name__, example, attempt + 1, policy.attempts - 1, wait)
        sleep(wait)
        again = fetch([keys[index] for index in pending])
        retried += len(pending)
        for index, result in zip(pending, again):
            results[index] = result
    return results, retried
