"""TFRecord framing and tf.train.Example encoding, without TensorFlow.

A TFRecord file is a sequence of records: uint64 length (little-endian), masked CRC-32C of
those 8 bytes, the payload, masked CRC-32C of the payload. Data preparation writes millions
of them, so the Example protobuf is encoded by hand from numpy arrays (the wire format of a
map<string, Feature> is small and fixed) instead of importing TensorFlow or building
protobuf objects per record. Readers use the same module, and tests check every byte
against TensorFlow's own parser.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c
import numpy as np

from bertdistill.errors import StepError

_MASK_DELTA = 0xA282EAD8
_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(payload: bytes) -> bytes:
    header = _LEN.pack(len(payload))
    return b"".join((header, _CRC.pack(masked_crc(header)), payload, _CRC.pack(masked_crc(payload))))


def split_framed(data: bytes) -> list[bytes]:
    """Framed records back to back -> one bytes object per record, frame included (no CRC check:
    for bytes this process framed itself)."""
    out, at = [], 0
    while at < len(data):
        end = at + 16 + _LEN.unpack_from(data, at)[0]
        out.append(data[at:end])
        at = end
    return out


def read_records(f: BinaryIO, name: str = "<stream>") -> Iterator[bytes]:
    """Yield payloads, verifying both CRCs; a damaged file is a clear error, not garbage."""
    index = 0
    while True:
        header = f.read(12)
        if not header:
            return
        if len(header) < 12:
            raise StepError(f"{name}: record {index} is truncated (file cut short); regenerate it")
        (length,) = _LEN.unpack_from(header)
        if _CRC.unpack_from(header, 8)[0] != masked_crc(header[:8]):
            raise StepError(f"{name}: record {index} has a bad length CRC; the file is corrupt, regenerate it")
        payload = f.read(length)
        footer = f.read(4)
        if len(payload) < length or len(footer) < 4:
            raise StepError(f"{name}: record {index} is truncated (file cut short); regenerate it")
        if _CRC.unpack(footer)[0] != masked_crc(payload):
            raise StepError(f"{name}: record {index} has a bad data CRC; the file is corrupt, regenerate it")
        yield payload
        index += 1


# ---- protobuf wire format -------------------------------------------------------------
_VARINT = [bytes([n]) if n < 0x80 else None for n in range(1 << 14)]
for _n in range(0x80, 1 << 14):
    _VARINT[_n] = bytes([(_n & 0x7F) | 0x80, _n >> 7])


def varint(n: int) -> bytes:
    if n < (1 << 14):
        return _VARINT[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def packed_varints(values: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Varint-encode a [rows, cols] array of non-negative ints (< 2**28) row by row.

    Returns one byte string holding all rows back to back and each row's end offset, so a
    caller slices row r as data[ends[r-1]:ends[r]].
    """
    v = values.astype(np.int64, copy=False)
    if v.size and (v.min() < 0 or v.max() >= 1 << 28):
        raise ValueError("packed_varints handles 0 <= value < 2**28")
    nbytes = 1 + (v >= 1 << 7).astype(np.int64) + (v >= 1 << 14) + (v >= 1 << 21)
    flat_n = nbytes.ravel()
    starts = np.cumsum(flat_n) - flat_n
    out = np.zeros(int(flat_n.sum()), dtype=np.uint8)
    flat_v = v.ravel()
    for k in range(4):
        sel = flat_n > k
        if not sel.any():
            break
        byte = (flat_v[sel] >> (7 * k)) & 0x7F
        byte |= np.where(flat_n[sel] > k + 1, 0x80, 0)
        out[starts[sel] + k] = byte
    return out.tobytes(), np.cumsum(nbytes.sum(axis=1))


def _entry(key: bytes, feature_field: int, payload: bytes) -> bytes:
    """One map<string, Feature> entry whose Feature holds a packed list in `feature_field`."""
    lst = b"\x0a" + varint(len(payload)) + payload  # XxxList.value (field 1, packed)
    feature = bytes([(feature_field << 3) | 2]) + varint(len(lst)) + lst
    body = b"\x0a" + varint(len(key)) + key + b"\x12" + varint(len(feature)) + feature
    return b"\x0a" + varint(len(body)) + body  # Features.feature (field 1)


INT64, FLOAT, BYTES = 3, 2, 1  # Feature oneof field numbers: int64_list, float_list, bytes_list


def encode_example(features: list[tuple[bytes, int, bytes]]) -> bytes:
    """tf.train.Example from (key, kind, payload); payload is packed varints for INT64,
    little-endian float32s for FLOAT, and for BYTES the already-encoded BytesList body."""
    body = b"".join(_entry(key, kind, payload) if kind != BYTES else bytes_entry(key, payload)
                    for key, kind, payload in features)
    return b"\x0a" + varint(len(body)) + body


def bytes_entry(key: bytes, values_body: bytes) -> bytes:
    feature = b"\x0a" + varint(len(values_body)) + values_body
    body = b"\x0a" + varint(len(key)) + key + b"\x12" + varint(len(feature)) + feature
    return b"\x0a" + varint(len(body)) + body


def bytes_list_body(values: list[bytes]) -> bytes:
    return b"".join(b"\x0a" + varint(len(v)) + v for v in values)


# ---- decoding (tests, readers, tools) ---------------------------------------------------
def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            n, pos = read_varint(buf, pos)
            yield field, wire, buf[pos : pos + n]
            pos += n
        elif wire == 0:
            value, pos = read_varint(buf, pos)
            yield field, wire, value
        elif wire == 5:
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def decode_example(payload: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """Decode a tf.train.Example into {key: int64 array | float32 array | list of bytes}."""
    out: dict[str, np.ndarray | list[bytes]] = {}
    for _, _, features in _fields(payload):
        for _, _, entry in _fields(features):
            key, value = b"", b""
            for field, _, data in _fields(entry):
                if field == 1:
                    key = data
                elif field == 2:
                    value = data
            out[key.decode()] = _decode_feature(value)
    return out


def _decode_feature(feature: bytes):
    for kind, _, lst in _fields(feature):
        if kind == BYTES:
            return [v for _, _, v in _fields(lst)]
        values: list = []
        for _, wire, data in _fields(lst):
            if kind == FLOAT:
                values.extend(np.frombuffer(data, dtype="<f4").tolist())
            elif wire == 2:
                pos = 0
                while pos < len(data):
                    v, pos = read_varint(data, pos)
                    values.append(v - (1 << 64) if v >= 1 << 63 else v)
            else:
                values.append(data)
        return np.array(values, dtype=np.float32 if kind == FLOAT else np.int64)
    return np.array([], dtype=np.int64)
