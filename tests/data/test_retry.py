"""The project's retry policy: transient errors retried with bounded, jittered backoff, permanent
ones never; the batched form retries only what failed transiently, one wait per round; the corpus
readers' batched file reads go through it."""

from __future__ import annotations

import errno
import json
import random

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.data import retry
from pipeline.data.readers.files import read_files


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def failing(errors: list[BaseException], value="ok"):
    """A callable that raises `errors` one by one, then returns `value`; counts its calls."""
    calls = []

    def function():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return value

    function.calls = calls
    return function


@pytest.mark.parametrize("error, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (TimeoutError("read timed out"), True),
    (OSError(errno.EREMOTEIO, "Service Unavailable"), True),  # s3fs's 5xx after botocore gave up
    (RuntimeError("unknown"), True),
    (FileNotFoundError("gone"), False),
    (PermissionError("denied"), False),
    (OSError(errno.EACCES, "Access Denied"), False),
    (ValueError("corrupt"), False),
])
def test_transient_and_permanent_errors(error, transient):
    assert retry.is_transient(error) is transient


def gcs_error(status: int, message: str = "") -> Exception:
    """The exception gcsfs itself raises for a GCS JSON-API answer of `status` (its own
    `validate_response`, so a change in how gcsfs maps statuses shows up here)."""
    from gcsfs.retry import validate_response

    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    with pytest.raises(Exception) as caught:
        validate_response(status, body, "b/{}/o/{}", args=("bucket", "frames/00001.jpg"))
    return caught.value


@pytest.mark.parametrize("status, message, transient", [
    (408, "Request Timeout", True),
    (429, "The rate of change requests to the object is too high", True),
    (500, "Internal Error", True),
    (502, "Bad Gateway", True),  # gcsfs raises requests' ProxyError for it
    (503, "Service Unavailable", True),
    (504, "Gateway Timeout", True),
    (400, "Bad Request", False),
    (401, "Anonymous caller does not have storage.objects.get access", False),
    (403, "caller does not have storage.objects.get access", False),  # a bare OSError, no errno
    (404, "No such object", False),
    (409, "Conflict", False),
    (412, "Precondition Failed", False),
])
def test_gcs_answers_transient_and_permanent(status, message, transient):
    assert retry.is_transient(gcs_error(status, message)) is transient


def gcs_stack_errors():
    """Errors the GCS client stack raises besides gcsfs's own answers, with whether a retry may
    help: aiohttp's connection and response errors, fsspec's timeout, google-auth's and
    google-api-core's errors."""
    import aiohttp
    from fsspec.exceptions import FSTimeoutError
    from google.api_core import exceptions as api_errors
    from google.auth import exceptions as auth_errors

    def answer(status):
        return aiohttp.ClientResponseError(request_info=None, history=(), status=status, message="x")

    return [
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), True),
        (aiohttp.ClientOSError(errno.ECONNREFUSED, "Connection refused"), True),
        (aiohttp.ClientPayloadError("Response payload is not completed"), True),
        (FSTimeoutError(), True),
        (answer(503), True),
        (answer(429), True),
        (answer(404), False),
        (answer(403), False),
        (api_errors.ServiceUnavailable("unavailable"), True),
        (api_errors.TooManyRequests("slow down"), True),
        (api_errors.NotFound("no such bucket"), False),
        (api_errors.Forbidden("denied"), False),
        (auth_errors.RefreshError("metadata server timed out"), True),
        (auth_errors.DefaultCredentialsError("default credentials were not found"), False),
    ]


def test_gcs_client_stack_errors_transient_and_permanent():
    errors = gcs_stack_errors()
    assert [retry.is_transient(error) for error, _ in errors] == [transient for _, transient in errors]


def test_call_retries_gcs_server_trouble_but_never_a_forbidden_object():
    sleeps = Sleeps()
    function = failing([gcs_error(503), gcs_error(429), gcs_error(502)])
    assert retry.call(function, "test", retry.RetryPolicy(attempts=5), sleep=sleeps) == "ok"
    assert len(function.calls) == 4 and len(sleeps) == 3
    sleeps = Sleeps()
    function = failing([gcs_error(403, "denied")])
    with pytest.raises(OSError, match="Forbidden"):
        retry.call(function, "test", sleep=sleeps)
    assert len(function.calls) == 1 and sleeps == []


def test_call_retries_transient_errors_until_it_succeeds():
    sleeps = Sleeps()
    function = failing([ConnectionResetError("reset"), TimeoutError("slow")])
    policy = retry.RetryPolicy(attempts=5, base_delay=1.0, max_delay=3.0)
    assert retry.call(function, "test", policy, sleep=sleeps, rng=random.Random(0)) == "ok"
    assert len(function.calls) == 3
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 1.0 and 0 <= sleeps[1] <= 2.0


def test_call_gives_up_after_its_attempts_with_the_last_error():
    sleeps = Sleeps()
    function = failing([TimeoutError(f"slow {index}") for index in range(10)])
    with pytest.raises(TimeoutError, match="slow 3"):
        retry.call(function, "test", retry.RetryPolicy(attempts=4), sleep=sleeps)
    assert len(function.calls) == 4 and len(sleeps) == 3


def test_call_never_retries_a_permanent_error():
    sleeps = Sleeps()
    function = failing([FileNotFoundError("no such key")])
    with pytest.raises(FileNotFoundError):
        retry.call(function, "test", sleep=sleeps)
    assert len(function.calls) == 1 and sleeps == []


def test_backoff_grows_is_capped_and_jittered():
    policy = retry.RetryPolicy(attempts=9, base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    draws = [[policy.delay(retry_number, rng) for _ in range(200)] for retry_number in range(8)]
    ceilings = [min(4.0, 0.5 * 2 ** number) for number in range(8)]
    for values, ceiling in zip(draws, ceilings):
        assert max(values) <= ceiling
        assert max(values) > 0.8 * ceiling  # full jitter reaches near the ceiling
        assert min(values) < 0.2 * ceiling  # ... and near zero: retries spread out
    assert policy.longest_wait() == sum(ceilings)


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError, match="attempts"):
        retry.RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="negative"):
        retry.RetryPolicy(base_delay=-1)


def test_batched_retry_refetches_only_transient_failures_one_wait_per_round():
    sleeps = Sleeps()
    keys = ["a", "b", "c", "d"]
    first = [b"A", ConnectionResetError("reset"), FileNotFoundError("c"), TimeoutError("slow")]
    rounds = []

    def fetch(again):
        rounds.append(list(again))
        # b recovers at once; d needs one more round
        return [b"B" if key == "b" else (TimeoutError("still") if len(rounds) == 1 else b"D") for key in again]

    results, retried = retry.retry_failed(keys, first, fetch, retry.RetryPolicy(attempts=5), sleep=sleeps)
    assert rounds == [["b", "d"], ["d"]]
    assert results[0] == b"A" and results[1] == b"B" and results[3] == b"D"
    assert isinstance(results[2], FileNotFoundError)
    assert retried == 3 and len(sleeps) == 2


def test_batched_retry_stops_after_the_policy():
    sleeps = Sleeps()
    calls = []

    def fetch(again):
        calls.append(again)
        return [TimeoutError("down") for _ in again]

    results, retried = retry.retry_failed(["a"], [TimeoutError("down")], fetch,
                                          retry.RetryPolicy(attempts=3), sleep=sleeps)
    assert isinstance(results[0], TimeoutError)
    assert len(calls) == 2 and retried == 2 and len(sleeps) == 2


class FlakyMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem whose first `failures` reads of each flaky path reset the connection
    (what a throttled or restarting S3 endpoint looks like to a reader)."""

    protocol = "flakymemory"
    store: dict = {}  # its own, not MemoryFileSystem's process-wide store
    pseudo_dirs = [""]
    failures: dict[str, int] = {}

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        left = self.failures.get(path, 0)
        if left:
            self.failures[path] = left - 1
            raise ConnectionResetError(errno.ECONNRESET, f"reset reading {path}")
        return super().cat_file(path, start, end, **kwargs)


def test_reader_file_batches_survive_transient_errors():
    fs = FlakyMemoryFileSystem(skip_instance_cache=True)
    for name in ("one", "two", "three"):
        fs.pipe_file(f"/corpus/{name}.jpg", name.encode())
    FlakyMemoryFileSystem.failures = {"/corpus/two.jpg": 2, "/corpus/three.jpg": 10}
    paths = ["/corpus/one.jpg", "/corpus/two.jpg", "/corpus/three.jpg", "/corpus/absent.jpg"]
    results = read_files(fs, paths, retry.RetryPolicy(attempts=4, base_delay=0.0))
    assert results[0] == b"one"
    assert results[1] == b"two"  # recovered on its third read
    assert isinstance(results[2], ConnectionResetError)  # still failing after 4 reads: skipped
    assert isinstance(results[3], FileNotFoundError)  # absent: never retried
    assert FlakyMemoryFileSystem.failures["/corpus/three.jpg"] == 6
