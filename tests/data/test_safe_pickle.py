"""The restricted unpickler: plain CIFAR data loads, anything that could run code is refused."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess

import numpy as np
import pytest

from convpipe.data.safe_pickle import restricted_load
from convpipe.errors import ConvpipeError
from tests.helpers import datagen as D


class TouchViaSystem:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TouchViaOpen:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class TouchViaPopen:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


@pytest.mark.parametrize("payload", [TouchViaSystem, TouchViaOpen, TouchViaPopen])
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_malicious_pickle_refused_and_has_no_side_effect(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    # Nested inside a CIFAR-looking dict, as a tampered data_batch_1 would be.
    data = pickle.dumps({b"data": payload(str(marker)), b"labels": [1]}, protocol=protocol)
    with pytest.raises(ConvpipeError) as caught:
        restricted_load(data, "cifar/data_batch_1")
    message = str(caught.value)
    assert message.startswith("refusing to unpickle ")
    assert ": not plain data, in cifar/data_batch_1, " in message
    assert "trusted source" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("posix", "system"),
        ("subprocess", "Popen"),
        ("functools", "partial"),
        ("numpy", "load"),
        ("numpy.testing", "assert_"),
        ("_codecs", "decode"),
        ("evil_module_that_does_not_exist", "run"),
    ],
)
def test_any_other_global_refused_before_import(module, name):
    # GLOBAL opcode, then call it with one string argument (protocol 0 text format).
    data = f"c{module}\n{name}\n(S'1+1'\ntR.".encode()
    with pytest.raises(ConvpipeError, match=rf"refusing to unpickle {module}\.{name}: not plain"):
        restricted_load(data, "x.pkl")


def test_codecs_encode_only_for_latin1():
    assert restricted_load(pickle.dumps(b"\x00\xff", protocol=2), "b.pkl") == b"\x00\xff"
    rot13 = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(ConvpipeError, match=r"not a valid pickle.*rot13.*, in r\.pkl"):
        restricted_load(rot13, "r.pkl")


def test_python3_protocol2_batch_loads():
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"data": data, b"labels": [3, 7], b"batch_label": b"training batch 1 of 5"}
    loaded = restricted_load(pickle.dumps(batch, protocol=2), "data_batch_1")
    assert set(loaded) == set(batch)
    np.testing.assert_array_equal(loaded[b"data"], data)
    assert loaded[b"data"].dtype == np.uint8
    assert loaded[b"labels"] == [3, 7]


def test_python2_style_batch_loads_from_file_object():
    pixels = np.arange(5 * 3072, dtype=np.uint8).reshape(5, 3072)
    raw = D.py2_style_pickle({b"data": pixels, b"labels": [0, 1, 2, 3, 4], b"names": [b"a"]})
    # The real files' format: Python 2 strings and numpy 1.x module paths, no _codecs.
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    loaded = restricted_load(io.BytesIO(raw), "data_batch_1")
    np.testing.assert_array_equal(loaded[b"data"], pixels)
    assert loaded[b"names"] == [b"a"]


def test_numpy_scalars_and_other_dtypes_load():
    obj = {"n": np.int64(5), "f": np.float32(0.5), "a": np.ones((2, 2), dtype=">i4")}
    loaded = restricted_load(pickle.dumps(obj, protocol=2), "s.pkl")
    assert loaded["n"] == 5 and loaded["f"] == 0.5
    np.testing.assert_array_equal(loaded["a"], obj["a"])


@pytest.mark.parametrize(
    "data",
    [b"", b"not a pickle at all", pickle.dumps({b"data": list(range(100))}, protocol=2)[:-20]],
    ids=["empty", "garbage", "truncated"],
)
def test_broken_pickles_name_the_file(data):
    with pytest.raises(ConvpipeError) as caught:
        restricted_load(data, "cifar/test_batch")
    message = str(caught.value)
    assert message.startswith("not a valid pickle / truncated")
    assert "in cifar/test_batch" in message
