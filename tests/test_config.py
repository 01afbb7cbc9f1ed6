from __future__ import annotations

import copy

import pytest

from convpipe.config import load_params, parse_params, read_yaml
from convpipe.errors import ConvpipeError
from tests.conftest import ROOT


def test_shipped_params_validate():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "digits"
    assert params.train.monitor.startswith("val/")


def _error(raw_params, mutate) -> str:
    raw = copy.deepcopy(raw_params)
    mutate(raw)
    with pytest.raises(ConvpipeError) as info:
        parse_params(raw)
    return info.value.line()


def test_unknown_key_suggests_the_close_one(raw_params):
    line = _error(raw_params, lambda r: r["train"].__setitem__("lrr", 0.1))
    assert line.startswith("convpipe: error: unknown key 'train.lrr'")
    assert "did you mean 'train.lr'?" in line


def test_unknown_key_in_list_item(raw_params):
    line = _error(raw_params, lambda r: r["model"]["conv"][1].__setitem__("filtrs", 3))
    assert "model.conv[1].filtrs" in line and "model.conv[1].filters" in line


def test_unknown_section_suggests(raw_params):
    line = _error(raw_params, lambda r: r.__setitem__("augmnt", {}))
    assert "did you mean 'augment'?" in line


def test_unknown_key_without_close_match_lists_valid_keys(raw_params):
    line = _error(raw_params, lambda r: r["base"].__setitem__("zzzz", 1))
    assert "valid keys here: seed" in line


@pytest.mark.parametrize(
    ("section", "key", "value", "expect"),
    [
        ("model", "dropout", 1.0, "'model.dropout'"),
        ("model", "dropout", -0.1, "'model.dropout'"),
        ("train", "lr", 0.0, "'train.lr'"),
        ("train", "lr", "fast", "'train.lr'"),
        ("train", "reg_type", "l3", "'l1'"),
        ("train", "optimizer", "rmsprop", "'adam'"),
        ("train", "patience", -1, "'train.patience'"),
        ("train", "batch_size", 0, "train.batch_size"),
        ("train", "monitor", "loss", "'val/...'"),
        ("data", "on_bad_file", "ignore", "'skip'"),
        ("data", "source", "folder", "'imagefolder'"),
        ("data", "val_fraction", 1.2, "'data.val_fraction'"),
        ("augment", "copies", 1000, "at most 100"),
        ("train", "scheduler", "one_cycle", "'onecycle'"),
        ("train", "threads", 0, "train.threads must be a number >= 1 or 'auto', got 0"),
        ("train", "threads", "all", "got 'all'"),
        ("train", "channels_last", 2, "'train.channels_last'"),
        ("train", "compile", "maybe", "'train.compile'"),
    ],
)
def test_wrong_values_name_key_expected_and_got(raw_params, section, key, value, expect):
    line = _error(raw_params, lambda r: r[section].__setitem__(key, value))
    assert line.startswith("convpipe: error: ")
    assert expect in line
    assert "\n" not in line


def test_fractions_must_leave_a_train_split(raw_params):
    def mutate(r):
        r["data"]["val_fraction"] = 0.5
        r["data"]["test_fraction"] = 0.5

    assert "must be < 1" in _error(raw_params, mutate)


def test_path_required_for_file_sources(raw_params):
    line = _error(raw_params, lambda r: r["data"].__setitem__("source", "imagefolder"))
    assert "data.path is required" in line


def test_missing_key_is_an_error(raw_params):
    line = _error(raw_params, lambda r: r["train"].pop("lr"))
    assert "missing key 'train.lr'" in line


def test_batch_size_accepts_full_and_one(make_params):
    assert make_params(**{"train.batch_size": "full"}).train.batch_size == "full"
    assert make_params(**{"train.batch_size": 1}).train.batch_size == 1


def test_image_size_forms(make_params):
    assert make_params(**{"data.image_size": None}).data.size_hw() is None
    assert make_params(**{"data.image_size": 16}).data.size_hw() == (16, 16)
    assert make_params(**{"data.image_size": [12, 20]}).data.size_hw() == (12, 20)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConvpipeError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConvpipeError, match="not valid YAML"):
        load_params(bad)


def test_performance_keys(make_params):
    params = make_params(
        **{"train.threads": 3, "train.channels_last": False, "train.compile": True}
    )
    assert (params.train.threads, params.train.channels_last, params.train.compile) == (
        3,
        False,
        True,
    )
    assert make_params(**{"train.threads": "auto"}).train.threads == "auto"
    assert make_params(**{"train.scheduler": "onecycle"}).train.scheduler == "onecycle"


def _keys(tree, prefix=""):
    """Every dotted key of a params tree (list items of model.conv by position)."""
    if isinstance(tree, dict):
        return {k for key, value in tree.items() for k in _keys(value, f"{prefix}{key}.")}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        return {k for i, value in enumerate(tree) for k in _keys(value, f"{prefix}{i}.")}
    return {prefix.rstrip(".")}


def test_mnist_recipe_is_a_complete_params_file(raw_params):
    """params/mnist.yaml replaces params.yaml whole: the same keys, the same paths."""
    recipe = read_yaml(ROOT / "params" / "mnist.yaml")
    params = parse_params(recipe, "params/mnist.yaml")
    keys = {k for k in _keys(recipe) if not k.startswith(("model.conv.", "tune.space."))}
    assert keys == {
        k for k in _keys(raw_params) if not k.startswith(("model.conv.", "tune.space."))
    }
    assert recipe["paths"] == raw_params["paths"]  # dvc.yaml reads them
    assert (params.data.source, params.data.path) == ("mnist_idx", "data/mnist")
    assert params.data.test_fraction == 0.0  # MNIST's own t10k files are the test split


def test_performance_defaults_match_the_measured_recipe(raw_params):
    """The shipped knobs are the ones the benchmarks measured on params/mnist.yaml."""
    recipe = read_yaml(ROOT / "params" / "mnist.yaml")
    for key in ("threads", "channels_last", "compile", "num_workers", "precision"):
        assert recipe["train"][key] == raw_params["train"][key], key
