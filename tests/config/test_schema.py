from __future__ import annotations

import copy
import difflib
import shutil
from pathlib import Path
from typing import Any

import pytest

from convpipe.config.edit import apply_recipe, leaves, load_with_recipe, set_dotted, to_yaml
from convpipe.config.schema import load_params, parse_params, read_yaml
from convpipe.errors import ConvpipeError
from tests.helpers.project import ROOT


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
        ("runtime", "threads", 0, "runtime.threads must be a number >= 1 or 'auto', got 0"),
        ("runtime", "threads", "all", "got 'all'"),
        ("runtime", "channels_last", 2, "'runtime.channels_last'"),
        ("runtime", "compile", "maybe", "'runtime.compile'"),
        ("runtime", "num_workers", -1, "'runtime.num_workers'"),
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


def test_runtime_keys(make_params):
    params = make_params(
        **{"runtime.threads": 3, "runtime.channels_last": False, "runtime.compile": True}
    )
    runtime = params.runtime
    assert (runtime.threads, runtime.channels_last, runtime.compile) == (3, False, True)
    assert make_params(**{"runtime.threads": "auto"}).runtime.threads == "auto"
    assert make_params(**{"train.scheduler": "onecycle"}).train.scheduler == "onecycle"


def test_speed_keys_under_train_point_to_runtime(make_params):
    with pytest.raises(ConvpipeError) as info:
        make_params(**{"train.threads": 2})
    assert info.value.line() == (
        "convpipe: error: unknown key 'train.threads', in params.yaml, "
        "it is now 'runtime.threads': move it there"
    )


def _keys(tree, prefix=""):
    """Every dotted key of a params tree (list items of model.conv by position)."""
    if isinstance(tree, dict):
        return {k for key, value in tree.items() for k in _keys(value, f"{prefix}{key}.")}
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        return {k for i, value in enumerate(tree) for k in _keys(value, f"{prefix}{i}.")}
    return {prefix.rstrip(".")}


RECIPES = sorted((ROOT / "params").glob("*.yaml"))


def _leaf_lines(path: Path) -> dict[str, int]:
    """Each leaf key of a YAML file and the (0-based) line its key is on."""
    from ruamel.yaml import YAML
    from ruamel.yaml.nodes import MappingNode

    def walk(node: Any, prefix: str) -> dict[str, int]:
        out = {}
        for key, value in node.value:
            if isinstance(value, MappingNode):
                out |= walk(value, f"{prefix}{key.value}.")
            else:
                out[f"{prefix}{key.value}"] = key.start_mark.line
        return out

    return walk(YAML().compose(path.read_text()), "")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_a_recipe_holds_only_what_differs_each_with_its_reason(raw_params, recipe):
    overlay = dict(leaves(read_yaml(recipe)))
    shipped = dict(leaves(raw_params))
    assert [k for k, v in overlay.items() if shipped.get(k) == v] == []  # nothing repeated
    assert not [k for k in overlay if k.startswith("paths.")]  # dvc.yaml declares those once
    lines = recipe.read_text().splitlines()
    for key, line in _leaf_lines(recipe).items():
        said = "#" in lines[line] or lines[line - 1].lstrip().startswith("#")
        assert said, f"{recipe.name}: {key} has no comment saying why"
    load_with_recipe(recipe, ROOT / "params.yaml")  # a valid whole


def test_the_mnist_recipe(raw_params):
    params = load_with_recipe(ROOT / "params" / "mnist.yaml", ROOT / "params.yaml")
    assert (params.data.source, params.data.path) == ("mnist_idx", "data/mnist")
    assert params.data.test_fraction == 0.0  # MNIST's own t10k files are the test split
    assert params.runtime.model_dump() == raw_params["runtime"]  # measured with the shipped


def test_applying_a_recipe_changes_only_its_keys(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", target)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 0.01  # why\nmodel:\n  hidden:\n  - 64\n  - 32\n")
    before = target.read_text()
    assert apply_recipe(recipe, target) == ["train.lr", "model.hidden"]
    diff = difflib.unified_diff(before.splitlines(), target.read_text().splitlines(), n=0)
    changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    values = [line.split("#")[0].rstrip() for line in changed]
    assert sorted(values) == sorted(
        ["-  lr: 0.003", "+  lr: 0.01", "-  - 128", "+  - 64", "+  - 32"]
    )  # comments, order and every other line as they were
    assert "# the learning rate" in next(line for line in changed if line.startswith("+  lr:"))
    assert apply_recipe(recipe, target) == []  # applying twice changes nothing


def test_a_recipe_can_empty_a_list_and_keep_its_comment(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", target)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  hidden: []  # why\n  dropout: 0.0  # why\n")
    assert apply_recipe(recipe, target) == ["model.hidden", "model.dropout"]
    lines = target.read_text().splitlines()
    hidden = next(i for i, line in enumerate(lines) if line.startswith("  hidden:"))
    assert lines[hidden].split("#")[0].split() == ["hidden:", "[]"]
    assert "fully connected layer widths" in lines[hidden]  # the shipped comment stays
    assert lines[hidden + 1].split("#")[0].rstrip() == "  dropout: 0.0"  # its own line
    assert load_params(target).model.hidden == []


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "train:\n  lrr: 0.1\n",
            "unknown key 'train.lrr', in recipe {r}, did you mean 'train.lr'?",
        ),
        ("trian:\n  lr: 0.1\n", "unknown key 'trian.lr', in recipe {r}, did you mean 'train'?"),
        ("train:\n  lr: -1\n", "'train.lr': input should be greater than 0, got -1"),
        ("[1, 2]\n", "recipe {r} holds no keys"),
    ],
)
def test_a_bad_recipe_is_refused_and_writes_nothing(tmp_path, text, expect):
    target = tmp_path / "params.yaml"
    shutil.copyfile(ROOT / "params.yaml", target)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    with pytest.raises(ConvpipeError) as info:
        apply_recipe(recipe, target)
    assert expect.format(r=recipe) in info.value.line()
    assert target.read_bytes() == (ROOT / "params.yaml").read_bytes()


def test_resident_data_needs_the_transform_on_the_device(make_params):
    with pytest.raises(ConvpipeError) as info:
        make_params(**{"runtime.resident": True, "runtime.batch_transform": "loader"})
    assert "runtime.resident: true" in info.value.line()
    assert "set runtime.batch_transform to device or auto" in info.value.line()
    for placement in ("auto", "device"):
        params = make_params(**{"runtime.resident": True, "runtime.batch_transform": placement})
        assert params.runtime.resident


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e-05, "1.0e-05"),
        (0.003, "0.003"),
        (2.5e-07, "2.5e-07"),
        (64, "64"),
        (True, "true"),
        ("adam", "adam"),
        ("yes", '"yes"'),
        ("Off", '"Off"'),
        ("32-true", "32-true"),
    ],
)
def test_written_values_read_back_the_same_in_yaml_1_1_and_1_2(value: Any, text: str) -> None:
    """DVC and convpipe read YAML 1.2 (ruamel); PyYAML, and so many users' scripts, 1.1."""
    import yaml as pyyaml
    from ruamel.yaml import YAML

    written = to_yaml({"key": value})
    assert written == f"key: {text}\n"
    for loaded in (pyyaml.safe_load(written), YAML(typ="safe", pure=True).load(written)):
        assert loaded["key"] == value and type(loaded["key"]) is type(value)


def test_an_unknown_dotted_key_is_refused_with_the_closest(raw_params) -> None:
    raw_params = copy.deepcopy(raw_params)
    with pytest.raises(ConvpipeError) as info:
        set_dotted(raw_params, "train.lrr", 0.1, "in recipe r.yaml")
    assert str(info.value) == "unknown key 'train.lrr', in recipe r.yaml, did you mean 'train.lr'?"
    with pytest.raises(ConvpipeError, match=r"unknown key 'trian\.lr'.*did you mean 'train'"):
        set_dotted(raw_params, "trian.lr", 0.1)  # a missing parent, even when building
    set_dotted(raw_params, "train.threads", 2)  # building a tree to validate: a new leaf
    assert raw_params["train"]["threads"] == 2


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("s3://AKIAEXAMPLE:hunter2-secret@bucket/convpipe", "holds credentials"),
        ("gs://token@bucket/convpipe", "holds credentials"),
        ("bucket/convpipe", "must be an object-store URL LitData reads"),
        ("http://example.com/convpipe", "must be an object-store URL LitData reads"),
    ],
)
def test_stream_from_is_a_url_without_credentials_and_never_echoed(make_params, url, said):
    with pytest.raises(ConvpipeError, match=said) as caught:
        make_params(**{"runtime.stream_from": url})
    assert "hunter2" not in str(caught.value) and "token" not in str(caught.value)
    assert make_params(**{"runtime.stream_from": "s3://bucket/convpipe"}).runtime.stream_from
