"""The one exception tree of stream-service.

    StreamServiceError
    ├── ConfigError            a setting is missing, malformed or out of range (names the dotted key)
    ├── InputError             an array, image or file handed to a kernel is not what it must be
    │   ├── FrameShapeError    a frame does not match the reference or the configured size
    │   └── ImageReadError     an image file cannot be read or decoded
    ├── GoldenReferenceError   a golden reference is missing, corrupt or does not match its camera
    ├── RegistrationError      a frame could not be aligned to its reference
    ├── ModelError             a model file or card is missing, corrupt or inconsistent
    ├── DeviceError            the requested compute device (CUDA) is not available
    ├── MessageError           a wire message is malformed (bad header, size or version)
    ├── TransportError         a ZeroMQ socket failed (bind, connect, send, receive)
    ├── JournalError           the verdict journal cannot be opened or read, or a replay request is bad
    ├── CameraError            a camera source cannot be opened or stopped delivering frames
    └── BridgeError            a plant-protocol bridge (MQTT) cannot reach its broker or keep its state

Messages name the thing, the expected value and what was found. Third-party exceptions are
translated at the edge with ``raise XError(...) from exc``.

A flood of the same error (a peer sending bad messages) is logged as a rate, not a line each:
``RateLimitedLog`` writes the first of a kind at once, then at most one line per kind per interval
with the count since the last line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class StreamServiceError(Exception):
    """Base class of every error raised on purpose by stream-service."""


class ConfigError(StreamServiceError):
    """A setting is missing, malformed or out of range."""


class InputError(StreamServiceError, ValueError):
    """An input array, image or file is not what the function requires."""


class FrameShapeError(InputError):
    """A frame's shape does not match the reference or the configured frame size."""


class ImageReadError(InputError):
    """An image file cannot be read or decoded."""


class GoldenReferenceError(StreamServiceError):
    """A golden reference is missing, corrupt, or does not match the camera."""


class RegistrationError(StreamServiceError):
    """A frame could not be aligned to its reference."""


class ModelError(StreamServiceError):
    """A model file or model card is missing, corrupt or inconsistent."""


class DeviceError(StreamServiceError):
    """The requested compute device is not available."""


class MessageError(StreamServiceError):
    """A wire message is malformed: bad header, wrong payload size or unknown version."""


class TransportError(StreamServiceError):
    """A ZeroMQ socket operation failed."""


class SharedMemoryError(TransportError):
    """A shared-memory frame ring could not be created (no room in ``/dev/shm``, no permission)."""


class JournalError(StreamServiceError):
    """The verdict journal (SQLite) cannot be opened, written or read, or a replay request is malformed."""


class CameraError(StreamServiceError):
    """A camera source cannot be opened or stopped delivering frames."""


class BridgeError(StreamServiceError):
    """A plant-protocol bridge cannot reach its broker, or its state file cannot be read or written."""


class RateLimitedLog:
    """Warnings grouped by a bounded ``key`` (a rejection reason, an error type): at most one line per key
    every ``every_s`` seconds, carrying how many occurred since the previous line of that key.

    Keys must come from a fixed vocabulary (reasons, type names), never from what a peer sent: the
    table holds one entry per key.
    """

    def __init__(
        self, logger: logging.Logger, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger, self.every_s, self._clock = logger, every_s, clock
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object, exc_info: BaseException | None = None) -> bool:
        """Log ``message % args`` now when ``key`` was not logged within ``every_s`` (with the count of the
        suppressed ones), else count it. ``exc_info`` adds a traceback to the lines that are written.
        Returns whether a line was written."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._pending[key] = self._pending.get(key, 0) + 1
            return False
        suppressed = self._pending.pop(key, 0)
        self._last[key] = now
        if suppressed:
            message += f" (and {suppressed} more like it in the last %.0f s)"
            args = (*args, now - last if last is not None else self.every_s)
        self.logger.warning(message, *args, exc_info=exc_info)
        return True
