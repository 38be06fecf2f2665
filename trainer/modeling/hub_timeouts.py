"""Timeouts on every network call of `python -m trainer.modeling.weights` (the only part of the project that downloads).

huggingface_hub's shared HTTP client is created without a timeout, and its metadata requests (e.g. the repository
listing of `snapshot_download`) pass `timeout=None` explicitly, which overrides any client default: on an endpoint
that accepts connections and never answers they wait forever. Its retry of a timed-out file request waits a fixed
60 s, and it retries a timed-out request up to 5 times with a back-off (1 to 8 s), which for such an endpoint
multiplies the wait by about 7 per file (open_clip asks for two files per tag). `set_timeout` therefore gives the
library a client whose request hook fills every timeout a request leaves unset (hooks run before the transport reads
them) and whose transport gives an endpoint up after GIVE_UP_AFTER_TIMEOUTS timeouts in a row, and sets the
library's file timeouts (read once at import, so the module values as well as HF_HUB_ETAG_TIMEOUT /
HF_HUB_DOWNLOAD_TIMEOUT for child processes). urllib, which open_clip uses for plain-URL downloads, takes the socket
default. An endpoint that never answers thus ends a download after about 2 x the timeout + 1 s.

Transfers that huggingface_hub hands to hf_xet (large files of Xet-backed repositories) run on hf_xet's own
timeouts once the metadata requests have answered.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import httpx2
import huggingface_hub
from huggingface_hub import constants, file_download
from huggingface_hub.utils import _http

DEFAULT_TIMEOUT_S = 60.0
GIVE_UP_AFTER_TIMEOUTS = 2
_FILE_TIMEOUT_VARS = ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT")


class EndpointNotAnswering(TimeoutError):
    """Requests to an endpoint that has already timed out GIVE_UP_AFTER_TIMEOUTS times in a row. Not an httpx error,
    so huggingface_hub neither retries it nor falls back to its cache: it ends the download."""


def positive_seconds(text: str) -> float:
    """argparse type of --timeout: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got '{text}'") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got '{text}'")
    return value


def hub_endpoint() -> str:
    """The Hugging Face endpoint downloads go to (HF_ENDPOINT, else huggingface.co)."""
    return constants.ENDPOINT


def timed_out(exc: BaseException) -> bool:
    """Whether a network timeout is among `exc`'s causes (the hub clients wrap it in their own errors)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ or "timed out" in str(e).lower():
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None)]
    return False


def _giving_up_transport(seconds: float) -> Any:
    """An httpx2 transport that counts timeouts per endpoint and refuses one that timed out too often in a row."""

    class GiveUpTransport(httpx2.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.timeouts: dict[tuple, int] = {}

        def handle_request(self, request: Any) -> Any:
            origin = (request.url.scheme, request.url.host, request.url.port)
            if self.timeouts.get(origin, 0) >= GIVE_UP_AFTER_TIMEOUTS:
                raise EndpointNotAnswering(
                    f"{request.url.scheme}://{request.url.netloc.decode()} timed out "
                    f"{GIVE_UP_AFTER_TIMEOUTS} times in a row (timeout {seconds:g} s): given up"
                )
            try:
                response = super().handle_request(request)
            except httpx2.TimeoutException:
                self.timeouts[origin] = self.timeouts.get(origin, 0) + 1
                raise
            self.timeouts[origin] = 0
            return response

    return GiveUpTransport()


def _client_factory(seconds: float) -> Callable[[], Any]:
    def fill_timeouts(request: Any) -> None:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            kind: seconds if given.get(kind) is None else given[kind]
            for kind in ("connect", "read", "write", "pool")
        }

    def client() -> Any:
        hooks = _http.default_client_factory().event_hooks  # the library's own client: its hooks, plus ours
        return httpx2.Client(
            event_hooks=dict(hooks, request=[*hooks.get("request", []), fill_timeouts]),
            follow_redirects=True,
            timeout=seconds,
            transport=_giving_up_transport(seconds),
        )

    return client


def set_timeout(seconds: float) -> Callable[[], None]:
    """Every network call of this process gives up after `seconds` without an answer (the module docstring).
    Returns what puts the previous settings back (an in-process caller's later network use stays as it was)."""
    before = (
        socket.getdefaulttimeout(),
        {name: os.environ.get(name) for name in _FILE_TIMEOUT_VARS},
        (constants.HF_HUB_ETAG_TIMEOUT, constants.HF_HUB_DOWNLOAD_TIMEOUT, file_download._ETAG_RETRY_TIMEOUT),
        _http._GLOBAL_CLIENT_FACTORY,
    )

    def restore() -> None:
        socket.setdefaulttimeout(before[0])
        for name, value in before[1].items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
        (
            constants.HF_HUB_ETAG_TIMEOUT,
            constants.HF_HUB_DOWNLOAD_TIMEOUT,
            file_download._ETAG_RETRY_TIMEOUT,
        ) = before[2]
        huggingface_hub.set_client_factory(before[3])

    socket.setdefaulttimeout(seconds)
    whole = max(1, math.ceil(seconds))  # the library's file timeouts are whole seconds
    for name in _FILE_TIMEOUT_VARS:
        os.environ[name] = str(whole)
    constants.HF_HUB_ETAG_TIMEOUT = constants.HF_HUB_DOWNLOAD_TIMEOUT = whole
    file_download._ETAG_RETRY_TIMEOUT = whole  # the retry of a timed-out HEAD (60 s in the library)
    huggingface_hub.set_client_factory(_client_factory(seconds))
    return restore
