"""The bridge's Redis packer sends exactly the bytes redis-py's own packers would, and
refuses what they refuse with the same kind of error."""

from __future__ import annotations

import pytest
import redis
from redis.connection import Encoder, HiredisRespSerializer, PythonRespSerializer

from bridge.store.redis.connection import HiredisPacker

COMMANDS = [
    ("PING",),
    ("SCRIPT LOAD", "return redis.call('GET', KEYS[1])"),  # a name of two words
    (b"CLIENT SETINFO", b"LIB-NAME", "redis-py"),
    ("EVALSHA", "a" * 40, 1, "bridge:session:" + "f" * 43, "aal2", "Zoë ✓", b"\x00\xff"),
    ("ZADD", "index", 1733500000.123, "member", 0.1, "other", -0.0, "third"),
    ("SET", "big", 10**30, "EX", 5),
    ("HSET", "h", "empty", "", "negative", -5, "view", memoryview(b"seen")),
]


def _redis_py(packer: object, args: tuple[object, ...]) -> bytes:
    return b"".join(packer.pack(*args))  # type: ignore[attr-defined]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: str(args[0]))
def test_the_bytes_are_redis_pys(args):
    encode = Encoder("utf-8", "strict", False).encode
    python = PythonRespSerializer(6000, encode)
    theirs = {
        _redis_py(python, args),
        _redis_py(HiredisRespSerializer(python.pack, encode), args),
    }
    assert theirs == {b"".join(HiredisPacker().pack(*args))}


@pytest.mark.parametrize("value", [None, True, object(), bytearray(b"x")])
def test_what_cannot_be_sent_is_a_data_error(value):
    with pytest.raises(redis.DataError):
        HiredisPacker().pack("SET", "key", value)


def test_text_that_is_no_utf8_is_refused_as_redis_py_refuses_it():
    encode = Encoder("utf-8", "strict", False).encode
    with pytest.raises(UnicodeEncodeError):
        PythonRespSerializer(6000, encode).pack("SET", "key", "\ud800")
    with pytest.raises(UnicodeEncodeError):
        HiredisPacker().pack("SET", "key", "\ud800")
