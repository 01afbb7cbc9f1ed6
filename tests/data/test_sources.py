"""Every data source, from generated real-format data, and every way its input can be wrong."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convpipe.data.images import normalize
from convpipe.data.raw import BadFileError, RawDataset
from convpipe.data.readers import csv_table
from convpipe.data.readers.base import ArrayReader, FileReader
from convpipe.data.readers.cifar import open_cifar
from convpipe.data.readers.csv_table import open_csv
from convpipe.data.readers.imagefolder import open_imagefolder
from convpipe.data.readers.mnist_idx import open_mnist_idx
from convpipe.data.sources import open_source
from convpipe.errors import ConvpipeError
from tests.helpers import datagen as D


def data_params(make_params, source: str, path: Path | str | None, **csv):
    overrides = {"data.source": source, "data.path": None if path is None else str(path)}
    overrides.update({f"data.csv.{key}": value for key, value in csv.items()})
    return make_params(overrides).data


def pixels(ds: RawDataset, split: str, index: int) -> np.ndarray:
    return np.asarray(ds.splits[split].reader.load(index))


def error_of(func, *args) -> str:
    with pytest.raises(ConvpipeError) as caught:
        func(*args)
    return str(caught.value)


# --------------------------------------------------------------------------- readers


def test_array_reader_modes_and_names():
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    reader = ArrayReader(gray, "f.bin")
    assert len(reader) == 2 and reader.name(1) == "f.bin#1"
    assert (reader.probe(0).height, reader.probe(0).width, reader.probe(0).mode) == (3, 4, "L")
    np.testing.assert_array_equal(np.asarray(reader.load(1)), gray[1])
    for channels, mode in [(1, "L"), (3, "RGB"), (4, "RGBA")]:
        reader = ArrayReader(np.zeros((1, 2, 5, channels), np.uint8), "x")
        assert reader.probe(0).mode == mode and reader.load(0).mode == mode
        assert reader.load(0).size == (5, 2)
    with pytest.raises(IndexError):
        reader.load(1)


@pytest.mark.parametrize("array", [np.zeros((2, 3, 3), np.float32), np.zeros((3, 3), np.uint8)])
def test_array_reader_rejects_wrong_arrays(array):
    with pytest.raises(ValueError, match="uint8 array"):
        ArrayReader(array, "x")


# --------------------------------------------------------------------------- digits


def test_digits(make_params):
    ds = open_source(data_params(make_params, "digits", None))
    assert ds.source == "digits" and ds.class_names == [str(d) for d in range(10)]
    split = ds.splits["all"]
    assert list(ds.splits) == ["all"] and len(split.reader) == 1797
    assert split.labels.dtype == np.int64 and set(split.labels.tolist()) == set(range(10))
    assert split.reader.probe(0).mode == "L" and split.reader.load(0).size == (8, 8)
    from sklearn.datasets import load_digits

    raw = load_digits().images[:50]
    got = np.stack([pixels(ds, "all", i) for i in range(50)])
    np.testing.assert_array_equal(got, np.rint(raw * 255 / 16))
    assert set(got[raw == 16].tolist()) == {255} and set(got[raw == 8].tolist()) == {128}


# --------------------------------------------------------------------------- imagefolder


@pytest.mark.parametrize("fmt", ["png", "gif", "bmp", "tif", "webp"])
def test_imagefolder_flat_lossless_formats(tmp_path, make_params, fmt):
    root = D.write_imagefolder(tmp_path / "data", fmt=fmt, n_per_class=2, classes=("3", "1", "7"))
    ds = open_source(data_params(make_params, "imagefolder", root))
    assert ds.class_names == ["1", "3", "7"] and list(ds.splits) == ["all"]
    split = ds.splits["all"]
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [Path(split.reader.name(i)).parent.name for i in range(6)] == [
        "1",
        "1",
        "3",
        "3",
        "7",
        "7",
    ]
    expected = D.digits_of_class(3, 2, 16)
    assert split.reader.probe(2).height == 16
    got = normalize(split.reader.load(2), 1, None)[:, :, 0]
    np.testing.assert_array_equal(got, expected[0])


def test_imagefolder_split_layout_jpeg(tmp_path, make_params):
    root = D.write_imagefolder(tmp_path / "d", fmt="jpg", layout="split", n_per_class=2, color=True)
    ds = open_source(data_params(make_params, "imagefolder", root))
    assert list(ds.splits) == ["train", "val", "test"] and ds.class_names == ["0", "1", "2"]
    for split in ds.splits.values():
        assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]
        assert split.reader.probe(0).mode == "RGB"
    assert "/val/" in ds.splits["val"].reader.name(0)
    # JPEG is lossy: compare to the original with a tolerance.
    original = D.colorize(D.digits_of_class(0, 2, 16)[0]).astype(int)
    assert np.abs(pixels(ds, "train", 0).astype(int) - original).mean() < 6


def test_imagefolder_split_layout_optional_splits_and_class_union(tmp_path):
    D.write_imagefolder(tmp_path, layout="split", splits=("train",), classes=("a", "b"))
    D.write_imagefolder(tmp_path, layout="split", splits=("test",), classes=("b", "c"))
    ds = open_imagefolder(str(tmp_path))
    assert list(ds.splits) == ["train", "test"] and ds.class_names == ["a", "b", "c"]
    assert ds.splits["train"].labels.tolist() == [0] * 3 + [1] * 3
    assert ds.splits["test"].labels.tolist() == [1] * 3 + [2] * 3


def test_imagefolder_recurses_ignores_hidden_and_non_images(tmp_path):
    D.write_imagefolder(tmp_path, classes=("cat", "dog"), n_per_class=1)
    img = np.zeros((4, 4), np.uint8)
    D.save_image(img, tmp_path / "cat" / "deep" / "deeper" / "x.PNG")  # nested, upper case
    D.save_image(img, tmp_path / "cat" / ".hidden.png")
    D.save_image(img, tmp_path / "cat" / ".cache" / "y.png")
    D.save_image(img, tmp_path / ".ipynb_checkpoints" / "z.png")  # a hidden "class"
    (tmp_path / "cat" / "notes.txt").write_text("x")
    (tmp_path / "dog" / "labels.csv").write_text("x")
    (tmp_path / "README.md").write_text("about")
    ds = open_imagefolder(str(tmp_path))
    assert ds.class_names == ["cat", "dog"]
    reader = ds.splits["all"].reader
    names = [reader.name(i) for i in range(len(reader))]
    assert len(names) == 3 and names[0].endswith("cat/cat_000.png")
    assert names[1].endswith("cat/deep/deeper/x.PNG")
    assert isinstance(reader, FileReader) and reader.ignored == 3


def test_imagefolder_order_is_sorted_and_deterministic(tmp_path):
    for name in ["b.png", "a.png", "c.png", "sub/a.png"]:
        D.save_image(np.zeros((2, 2), np.uint8), tmp_path / "k" / name)
    reader = open_imagefolder(str(tmp_path)).splits["all"].reader
    assert [Path(reader.name(i)).relative_to(tmp_path).as_posix() for i in range(4)] == [
        "k/a.png",
        "k/b.png",
        "k/c.png",
        "k/sub/a.png",
    ]


def test_imagefolder_symlinked_class_folder_is_followed_and_reported(tmp_path, caplog):
    D.write_imagefolder(tmp_path / "elsewhere", classes=("5",), n_per_class=2)
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "elsewhere" / "5", tmp_path / "data" / "five")
    with caplog.at_level("WARNING", logger="convpipe"):
        ds = open_imagefolder(str(tmp_path / "data"))
    assert ds.class_names == ["five"] and len(ds.splits["all"].reader) == 2
    assert "1 image file(s) or class folder(s)" in caplog.text
    assert f"{tmp_path / 'data' / 'five'} -> {tmp_path / 'elsewhere' / '5'}" in caplog.text


def test_imagefolder_reports_files_linked_out_of_data_path(tmp_path, caplog):
    D.write_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=2)
    secret = D.save_image(np.zeros((8, 8), np.uint8), tmp_path / "private" / "x.png")
    os.symlink(secret, tmp_path / "data" / "a" / "planted.png")
    os.symlink(tmp_path / "private", tmp_path / "data" / "b" / "sub")
    os.symlink(
        sorted((tmp_path / "data" / "b").glob("*.png"))[0], tmp_path / "data" / "a" / "in.png"
    )
    with caplog.at_level("WARNING", logger="convpipe"):
        ds = open_imagefolder(str(tmp_path / "data"))
    assert len(ds.splits["all"].reader) == 2 + 2 + 2 + 1  # links are read
    assert "2 image file(s) or class folder(s)" in caplog.text  # the inside link is fine
    assert "planted.png" in caplog.text


def test_imagefolder_without_links_out_says_nothing(tmp_path, caplog):
    D.write_imagefolder(tmp_path / "data", classes=("a", "b"), n_per_class=2)
    with caplog.at_level("WARNING", logger="convpipe"):
        open_imagefolder(str(tmp_path / "data"))
    assert "links to outside" not in caplog.text


@pytest.mark.timeout(20)
def test_imagefolder_symlink_loops_do_not_hang(tmp_path):
    D.write_imagefolder(tmp_path, classes=("0", "1"), n_per_class=2)
    D.write_symlink_loop(tmp_path / "0")  # self.png -> self.png, loop -> ., sub/up -> ..
    os.symlink("..", tmp_path / "1" / "root")  # a link to the dataset root

    result: list[RawDataset] = []
    worker = threading.Thread(
        target=lambda: result.append(open_imagefolder(str(tmp_path))), daemon=True
    )
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "discovery hung on a symlink loop"
    reader = result[0].splits["all"].reader
    names = [reader.name(i) for i in range(len(reader))]
    # Each real image once; the self-looping link is listed, and reported when read.
    assert len(names) == 5 and sum(n.endswith("self.png") for n in names) == 1
    loop_index = next(i for i, n in enumerate(names) if n.endswith("self.png"))
    with pytest.raises(BadFileError, match="symlink loop"):
        reader.probe(loop_index)


def test_imagefolder_bad_files_are_listed_then_reported_by_the_reader(tmp_path):
    D.write_imagefolder(tmp_path, classes=("0",), n_per_class=1)
    D.write_zero_byte(tmp_path / "0")
    D.write_truncated_png(tmp_path / "0")
    D.write_not_an_image(tmp_path / "0")
    reader = open_imagefolder(str(tmp_path)).splits["all"].reader
    reasons = {}
    for i in range(len(reader)):
        try:
            reader.load(i)
        except BadFileError as exc:
            reasons[Path(exc.path).name] = exc.reason
    assert reasons == {
        "empty.png": "empty file",
        "truncated.png": "truncated image",
        "notes.png": "not an image",
    }


def test_imagefolder_file_removed_between_probe_and_load(tmp_path):
    D.write_imagefolder(tmp_path, classes=("0",), n_per_class=2)
    reader = open_imagefolder(str(tmp_path)).splits["all"].reader
    assert reader.probe(1).width == 16
    Path(reader.name(1)).unlink()
    with pytest.raises(BadFileError) as caught:
        reader.load(1)
    assert caught.value.reason == "file disappeared while reading"
    assert reader.load(0).size == (16, 16)


def test_imagefolder_missing_path(tmp_path):
    message = error_of(open_imagefolder, str(tmp_path / "nope"))
    assert f"image folder not found: {tmp_path / 'nope'}" in message and "data.path" in message


def test_imagefolder_path_is_a_file(tmp_path):
    file = D.save_image(np.zeros((2, 2), np.uint8), tmp_path / "one.png")
    assert "must be a folder, got a file" in error_of(open_imagefolder, str(file))


def test_imagefolder_no_class_folders(tmp_path):
    (tmp_path / "README.txt").write_text("x")
    message = error_of(open_imagefolder, str(tmp_path))
    assert message.startswith(f"no class folders, in {tmp_path}, expected {tmp_path}/<class>/")


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    D.write_imagefolder(tmp_path, classes=("0", "1"))
    (tmp_path / "2" / "sub").mkdir(parents=True)
    (tmp_path / "2" / "readme.txt").write_text("x")
    message = error_of(open_imagefolder, str(tmp_path))
    assert "class folder has no image files" in message and f"in {tmp_path / '2'}," in message


def test_imagefolder_loose_images_beside_class_folders(tmp_path):
    D.write_imagefolder(tmp_path, classes=("0",))
    D.save_image(np.zeros((2, 2), np.uint8), tmp_path / "stray.jpg")
    message = error_of(open_imagefolder, str(tmp_path))
    assert "images directly in the folder (stray.jpg, ...) beside class folders" in message


def test_imagefolder_only_loose_images(tmp_path):
    D.save_image(np.zeros((2, 2), np.uint8), tmp_path / "a.png")
    assert "and no class folders" in error_of(open_imagefolder, str(tmp_path))


def test_imagefolder_split_folders_need_train(tmp_path):
    D.write_imagefolder(tmp_path, layout="split", splits=("val", "test"))
    assert "found but no train folder" in error_of(open_imagefolder, str(tmp_path))


def test_imagefolder_split_folders_mixed_with_class_folders(tmp_path):
    D.write_imagefolder(tmp_path, layout="split", splits=("train",))
    D.write_imagefolder(tmp_path, classes=("cat",))
    message = error_of(open_imagefolder, str(tmp_path))
    assert "split folders (train) mixed with other entries (cat, ...)" in message


def test_imagefolder_empty_split_folder(tmp_path):
    D.write_imagefolder(tmp_path, layout="split", splits=("train",))
    (tmp_path / "val").mkdir()
    assert f"no class folders, in {tmp_path / 'val'}" in error_of(open_imagefolder, str(tmp_path))


# --------------------------------------------------------------------------- mnist_idx


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, make_params, gz):
    root = D.write_idx(tmp_path, gz=gz, n_train=30, n_test=12)
    ds = open_source(data_params(make_params, "mnist_idx", root))
    assert list(ds.splits) == ["train", "test"]
    assert ds.class_names == [str(i) for i in range(10)]
    train, test = ds.splits["train"], ds.splits["test"]
    assert len(train.reader) == 30 and len(test.reader) == 12
    images, labels = D.digit_images(12, 28, start=30)
    np.testing.assert_array_equal(test.labels, labels)
    np.testing.assert_array_equal(pixels(ds, "test", 5), images[5])
    assert train.reader.probe(0).mode == "L" and train.reader.probe(0).height == 28
    suffix = ".gz" if gz else ""
    assert test.reader.name(3) == f"{tmp_path}/t10k-images-idx3-ubyte{suffix}#3"
    assert isinstance(train.reader._array, np.memmap) is not gz


def test_mnist_idx_prefers_raw_when_both_and_accepts_kaggle_names(tmp_path):
    D.write_idx(tmp_path, gz=True)
    D.write_idx(tmp_path, gz=False)
    ds = open_mnist_idx(str(tmp_path))
    assert ds.splits["train"].reader.name(0).endswith("train-images-idx3-ubyte#0")
    kaggle = tmp_path / "kaggle"
    D.write_idx(kaggle)
    for path in kaggle.iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert len(open_mnist_idx(str(kaggle)).splits["test"].reader) == 20


def test_mnist_idx_class_names_cover_the_largest_label(tmp_path):
    D.write_idx(tmp_path, n_train=7, n_test=3)  # digits 0..6 train, 7..9 test
    ds = open_mnist_idx(str(tmp_path))
    assert ds.class_names == [str(i) for i in range(10)]


def test_mnist_idx_missing_files_named(tmp_path):
    D.write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    message = error_of(open_mnist_idx, str(tmp_path))
    assert "missing MNIST file(s) t10k-labels-idx1-ubyte (raw or .gz)" in message
    assert "train-images-idx3-ubyte, train-labels-idx1-ubyte" in message


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_bad_magic(tmp_path, gz):
    D.write_idx(tmp_path, gz=gz)
    # Labels where the images should be: the classic swapped-files mistake.
    labels = np.zeros(60, np.uint8)
    target = tmp_path / "train-images-idx3-ubyte"
    D.write_idx_file(target, labels, D.IDX_LABELS_MAGIC, gz=gz)
    message = error_of(open_mnist_idx, str(tmp_path))
    assert "bad magic 0x00000801 (expected 0x00000803)" in message
    assert f"in {target}{'.gz' if gz else ''}" in message


def test_mnist_idx_mismatched_counts(tmp_path):
    D.write_idx(tmp_path, n_train=60)
    D.write_idx_file(
        tmp_path / "train-labels-idx1-ubyte", np.zeros(59, np.uint8), D.IDX_LABELS_MAGIC
    )
    message = error_of(open_mnist_idx, str(tmp_path))
    assert (
        "train-images-idx3-ubyte has 60 images but train-labels-idx1-ubyte has 59 labels" in message
    )


def test_mnist_idx_truncated_raw(tmp_path):
    D.write_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    message = error_of(open_mnist_idx, str(tmp_path))
    assert (
        "truncated IDX file: header says (60, 28, 28) = 47040 bytes of data, found 46940" in message
    )
    assert str(path) in message


def test_mnist_idx_truncated_header(tmp_path):
    D.write_idx(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    assert "truncated IDX header" in error_of(open_mnist_idx, str(tmp_path))


def test_mnist_idx_truncated_gz(tmp_path):
    D.write_idx(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-50])
    message = error_of(open_mnist_idx, str(tmp_path))
    assert "not a valid gzip file or truncated" in message and str(path) in message


def test_mnist_idx_gz_data_shorter_than_header(tmp_path):
    D.write_idx(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))
    assert "truncated IDX file" in error_of(open_mnist_idx, str(tmp_path))


def test_mnist_idx_gz_header_claiming_more_than_the_file_holds_is_refused_unread(tmp_path):
    D.write_idx(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # 60 images of 40,000 x 40,000: 96 GB, from a file of a few hundred bytes
    header = struct.pack(">IIII", D.IDX_IMAGES_MAGIC, 60, 40_000, 40_000)
    path.write_bytes(gzip.compress(header + b"\0" * 1000))
    message = error_of(open_mnist_idx, str(tmp_path))
    assert "(60, 40000, 40000) = 96000000000 bytes of data, more than a gzip file of" in message


def test_mnist_idx_trailing_data(tmp_path):
    D.write_idx(tmp_path)
    with open(tmp_path / "train-labels-idx1-ubyte", "ab") as fh:
        fh.write(b"\x00" * 3)
    assert "IDX file longer than its header says" in error_of(open_mnist_idx, str(tmp_path))


def test_mnist_idx_not_a_folder(tmp_path):
    assert "MNIST folder not found" in error_of(open_mnist_idx, str(tmp_path / "x"))


# --------------------------------------------------------------------------- cifar


@pytest.mark.parametrize("py2", [True, False])
def test_cifar10(tmp_path, make_params, py2):
    root = D.write_cifar(tmp_path, "cifar10", n=25, n_test=10, py2=py2)
    ds = open_source(data_params(make_params, "cifar", root))
    assert ds.class_names == D.CIFAR10_NAMES and list(ds.splits) == ["train", "test"]
    train, test = ds.splits["train"], ds.splits["test"]
    assert len(train.reader) == 25 and len(test.reader) == 10
    images, labels = D.digit_images(25, 32)
    np.testing.assert_array_equal(train.labels, labels)
    assert train.labels.dtype == np.int64
    assert train.reader.probe(7).mode == "RGB" and train.reader.probe(7).height == 32
    # Channel relation of D.colorize survives: R = g, G = g // 2, B = 255 - g.
    got = pixels(ds, "train", 7)
    np.testing.assert_array_equal(got, D.colorize(images[7]))
    assert train.reader.name(0) == f"{tmp_path}/data_batch_1#0"
    assert train.reader.name(7) == f"{tmp_path}/data_batch_2#2"
    assert train.reader.name(24) == f"{tmp_path}/data_batch_5#4"
    assert test.reader.name(9) == f"{tmp_path}/test_batch#9"


def test_cifar100(tmp_path):
    root = D.write_cifar(tmp_path, "cifar100", n=12, n_test=6)
    ds = open_cifar(str(root))
    assert len(ds.class_names) == 100 and ds.class_names[3] == "fine03"
    assert len(ds.splits["train"].reader) == 12 and len(ds.splits["test"].reader) == 6
    images, labels = D.digit_images(6, 32, start=12)
    np.testing.assert_array_equal(ds.splits["test"].labels, labels)
    np.testing.assert_array_equal(pixels(ds, "test", 2), D.colorize(images[2]))


def test_cifar_unknown_folder_suggests_inner_folder(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    message = error_of(open_cifar, str(tmp_path))
    assert "no CIFAR files: expected data_batch_1..5" in message
    assert f"did you mean data.path: {tmp_path / 'cifar-10-batches-py'}?" in message


def test_cifar_incomplete_folder(tmp_path):
    D.write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    assert "incomplete CIFAR-10 folder: missing data_batch_3" in error_of(open_cifar, str(tmp_path))


def test_cifar_malicious_batch_refused_without_side_effect(tmp_path):
    D.write_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    message = error_of(open_cifar, str(tmp_path))
    assert "refusing to unpickle" in message and str(tmp_path / "data_batch_2") in message
    assert not marker.exists()


def test_cifar_bad_data_shape(tmp_path):
    D.write_cifar(tmp_path)
    bad = {b"data": np.zeros((5, 1024), np.uint8), b"labels": [0] * 5}
    (tmp_path / "test_batch").write_bytes(D.py2_style_pickle(bad))
    message = error_of(open_cifar, str(tmp_path))
    assert "'data' must be an (N, 3072) uint8 array, got uint8 (5, 1024)" in message
    assert str(tmp_path / "test_batch") in message


def test_cifar_label_count_and_range(tmp_path):
    D.write_cifar(tmp_path)
    data = np.zeros((5, 3072), np.uint8)
    (tmp_path / "test_batch").write_bytes(D.py2_style_pickle({b"data": data, b"labels": [0] * 4}))
    assert "'labels' must hold 5 integers" in error_of(open_cifar, str(tmp_path))
    (tmp_path / "test_batch").write_bytes(D.py2_style_pickle({b"data": data, b"labels": [10] * 5}))
    assert "labels must lie in 0..9, found 10..10" in error_of(open_cifar, str(tmp_path))


def test_cifar_labels_of_nested_references_are_refused_before_conversion(tmp_path):
    # a few bytes of pickle: 5 references to one list of a million references to another;
    # np.asarray would build 5 x 10**6 x 10**3 elements
    D.write_cifar(tmp_path)
    inner = [0] * 1000
    middle = [inner] * 1_000_000
    bomb = {b"data": np.zeros((5, 3072), np.uint8), b"labels": [middle] * 5}
    (tmp_path / "test_batch").write_bytes(D.py2_style_pickle(bomb))
    message = error_of(open_cifar, str(tmp_path))
    assert (
        "'labels' must hold 5 integers (one per image), got a list of 5, an element is a list"
        in (message)
    )


def test_cifar_missing_key_and_not_a_dict(tmp_path):
    D.write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(D.py2_style_pickle({b"labels": [1]}))
    assert "CIFAR file has no 'data' entry" in error_of(open_cifar, str(tmp_path))
    (tmp_path / "batches.meta").write_bytes(D.py2_style_pickle([1, 2]))
    assert "expected a pickled dict, got list" in error_of(open_cifar, str(tmp_path))


def test_cifar_truncated_batch(tmp_path):
    D.write_cifar(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(path.read_bytes()[:300])
    message = error_of(open_cifar, str(tmp_path))
    assert "not a valid pickle / truncated" in message and str(path) in message


# --------------------------------------------------------------------------- csv


@pytest.mark.parametrize("header", [True, False])
def test_csv_with_and_without_header(tmp_path, make_params, header):
    path = D.write_csv(tmp_path / "train.csv", header=header, n=30)
    params = data_params(make_params, "csv", path, image_shape=[8, 8], label_column=0)
    ds = open_source(params)
    assert list(ds.splits) == ["all"] and ds.class_names == [str(d) for d in range(10)]
    images, labels = D.digit_images(30, 8)
    np.testing.assert_array_equal(ds.splits["all"].labels, labels)
    np.testing.assert_array_equal(pixels(ds, "all", 13), images[13])
    assert ds.splits["all"].reader.name(13) == f"{path}#13"


def test_csv_color_shape_label_column_and_crlf(tmp_path):
    path = D.write_csv(
        tmp_path / "c.csv", n=6, image_shape=(8, 8, 3), label_column=5, line_end="\r\n"
    )
    ds = open_csv(str(path), (8, 8, 3), 5)
    images, labels = D.digit_images(6, 8)
    np.testing.assert_array_equal(
        ds.splits["all"].labels, np.unique(labels, return_inverse=True)[1]
    )
    assert ds.splits["all"].reader.probe(0).mode == "RGB"
    np.testing.assert_array_equal(pixels(ds, "all", 4), D.colorize(images[4]))


def test_csv_labels_sorted_numerically_and_text_labels(tmp_path):
    path = D.write_csv(
        tmp_path / "n.csv", header=False, n=6, labels=["10", "9", "2", "-1", "09", "2"]
    )
    ds = open_csv(str(path), (8, 8), 0)
    assert ds.class_names == ["-1", "2", "9", "10"]
    assert ds.splits["all"].labels.tolist() == [3, 2, 1, 0, 2, 1]
    path = D.write_csv(tmp_path / "t.csv", header=False, n=4, labels=["cat", "dog", "ant", "cat"])
    ds = open_csv(str(path), (8, 8), 0)  # first row "cat,..." is data, not a header
    assert ds.class_names == ["ant", "cat", "dog"]
    assert ds.splits["all"].labels.tolist() == [1, 2, 0, 1]


def test_csv_blank_lines_and_bom_are_ignored(tmp_path):
    path = D.write_csv(tmp_path / "b.csv", n=5)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\n\n", 2) + b"\n  \n")
    assert len(open_csv(str(path), (8, 8), 0).splits["all"].reader) == 5


def test_csv_spans_several_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_table, "_CSV_CHUNK_ROWS", 7)
    path = D.write_csv(tmp_path / "big.csv", n=40)
    ds = open_csv(str(path), (8, 8), 0)
    images, _ = D.digit_images(40, 8)
    np.testing.assert_array_equal(pixels(ds, "all", 39), images[39])
    lines = path.read_text().splitlines()
    lines[30] = lines[30] + ",0"
    path.write_text("\n".join(lines) + "\n")
    assert "line 31: 66 fields, expected 65" in error_of(open_csv, str(path), (8, 8), 0)


def rewrite_line(path: Path, number: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda line: line + ",0", "line 4: 66 fields, expected 65"),
        (lambda line: line.rsplit(",", 1)[0], "line 4: 64 fields, expected 65"),
        (lambda line: line.replace(",0,", ",x,", 1), "is not an integer 0..255"),
        (lambda line: line.replace(",0,", ",256,", 1), "pixel '256' is not an integer 0..255"),
        (lambda line: line.replace(",0,", ",-1,", 1), "pixel '-1' is not an integer 0..255"),
        (lambda line: line.replace(",0,", ",99999,", 1), "pixel '99999' is not an integer"),
        (lambda line: line.replace(",0,", ",1.5,", 1), "pixel '1.5' is not an integer 0..255"),
        (lambda line: "," + line.split(",", 1)[1], "line 4: empty label"),
    ],
)
def test_csv_bad_row_names_file_and_line(tmp_path, edit, expected):
    path = D.write_csv(tmp_path / "bad.csv", header=True, n=8)
    rewrite_line(path, 4, edit)
    message = error_of(open_csv, str(path), (8, 8), 0)
    assert message.startswith("line 4: ") and expected in message
    assert f"in {path}" in message and "65 comma-separated fields" in message


def test_csv_bad_first_row_with_integer_label_is_not_taken_for_a_header(tmp_path):
    path = D.write_csv(tmp_path / "bad.csv", header=False, n=3)
    rewrite_line(path, 1, lambda line: line.replace(",0,", ",oops,", 1))
    assert "line 1: column " in error_of(open_csv, str(path), (8, 8), 0)


def test_csv_header_with_wrong_column_count(tmp_path):
    path = D.write_csv(tmp_path / "h.csv", header=True, n=3)
    assert "line 1: header has 65 columns, expected 785" in error_of(
        open_csv, str(path), (28, 28), 0
    )


def test_csv_wrong_image_shape_for_rows(tmp_path):
    path = D.write_csv(tmp_path / "s.csv", header=False, n=3)
    assert "line 1: 65 fields, expected 50" in error_of(open_csv, str(path), (7, 7), 0)


def test_csv_empty_file_missing_file_and_folder(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    assert "CSV file has no data rows" in error_of(open_csv, str(tmp_path / "empty.csv"), (8, 8), 0)
    header_only = D.write_csv(tmp_path / "h.csv", n=1)
    rewrite_line(header_only, 2, lambda line: "")
    assert "no data rows" in error_of(open_csv, str(header_only), (8, 8), 0)
    assert "CSV file not found" in error_of(open_csv, str(tmp_path / "x.csv"), (8, 8), 0)
    assert "must be a file, got a folder" in error_of(open_csv, str(tmp_path), (8, 8), 0)


def test_csv_bad_params(tmp_path):
    path = D.write_csv(tmp_path / "p.csv", n=2)
    message = error_of(open_csv, str(path), (8, 8), 65)
    assert "data.csv.label_column 65 is past the last of 65 fields" in message
    assert "1 to 4 channels" in error_of(open_csv, str(path), (4, 4, 5), 0)


def test_csv_not_text(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(bytes(range(256)) * 4)
    assert "not a UTF-8 text file" in error_of(open_csv, str(path), (8, 8), 0)


# --------------------------------------------------------------------------- dispatch


def test_open_source_requires_path(make_params):
    params = data_params(make_params, "digits", None).model_copy(update={"source": "cifar"})
    assert "data.path is required for data.source 'cifar'" in error_of(open_source, params)


def test_image_from_every_source_normalizes(tmp_path, make_params):
    D.write_imagefolder(tmp_path / "f", n_per_class=1)
    D.write_idx(tmp_path / "m", n_train=5, n_test=5)
    D.write_cifar(tmp_path / "c", n=5, n_test=5)
    D.write_csv(tmp_path / "x.csv", n=5)
    for source, path in [
        ("digits", None),
        ("imagefolder", tmp_path / "f"),
        ("mnist_idx", tmp_path / "m"),
        ("cifar", tmp_path / "c"),
        ("csv", tmp_path / "x.csv"),
    ]:
        ds = open_source(data_params(make_params, source, path, image_shape=[8, 8]))
        split = next(iter(ds.splits.values()))
        assert normalize(split.reader.load(0), 3, (12, 10)).shape == (12, 10, 3), source
        assert isinstance(split.reader.load(0), Image.Image)
