"""train.precision auto: measured per machine and model, never assumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convpipe.training import precision
from convpipe.training.precision import (
    BF16_FLAGS,
    CACHE_ENV,
    MIN_SPEEDUP,
    cache_path,
    choose_precision,
    cpu_flags,
    resolve_precision,
)
from tests.helpers.models import classifier, loader, tiny_model, train_variant, trainer


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse2 {flags}\n\n")
    return path


def test_bf16_only_when_clearly_faster():
    assert choose_precision(1.0, 1.0 / MIN_SPEEDUP) == "bf16-mixed"
    assert choose_precision(1.0, 0.9) == "32-true"  # a near tie keeps fp32
    assert choose_precision(1.0, 2.0) == "32-true"  # emulated bf16: slower


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, "avx2 amx_bf16"))
    assert {"sse2", "avx2", "amx_bf16"} <= cpu_flags()
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert cpu_flags() == frozenset()


def test_a_set_precision_is_kept_and_auto_without_native_bf16_is_fp32(
    params, tmp_path, monkeypatch
):
    module = classifier(params)
    for fixed in ("32-true", "bf16-mixed", "64-true"):
        train = train_variant(params, precision=fixed)
        assert resolve_precision(train, params.runtime, module, 16) == fixed
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, "avx2 avx512f"))
    auto = train_variant(params, precision="auto")
    assert resolve_precision(auto, params.runtime, module, 16) == "32-true"


def test_several_cpu_processes_keep_fp32(params, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, " ".join(BF16_FLAGS)))
    train = train_variant(params, precision="auto", devices=2, strategy="ddp_spawn")
    assert resolve_precision(train, params.runtime, classifier(params), 16) == "32-true"


def test_measuring_touches_neither_the_model_nor_the_random_state(params, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, " ".join(BF16_FLAGS)))
    monkeypatch.setattr(precision, "MIN_STEP_FLOPS", 0)  # measure even the tiny test network
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    module = classifier(params)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    chosen = resolve_precision(train_variant(params, precision="auto"), params.runtime, module, 32)
    assert chosen in ("32-true", "bf16-mixed")
    assert torch.equal(torch.get_rng_state(), rng)  # training draws the same numbers after
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert torch.get_num_threads() == threads


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_a_bf16_training_tests_in_fp32_as_evaluate_does(params):
    """train.json's test metrics equal evaluate's, which runs the fp32 weights in fp32."""
    torch.manual_seed(0)
    model = classifier(params, num_classes=3)
    data = loader(n=64)
    mixed = trainer(precision="bf16-mixed").test(model, data, verbose=False)[0]
    full = trainer(precision="32-true").test(model, data, verbose=False)[0]
    assert mixed["test/loss"] == pytest.approx(full["test/loss"], rel=1e-6)
    # bf16 would have changed it: the check can fail
    model.eval()
    x, y = next(iter(data))
    with torch.no_grad():
        fp32 = model.data_loss(model(x), y).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.data_loss(model(x), y).item()
    assert bf16 != pytest.approx(fp32, rel=1e-6)


def test_a_measured_verdict_is_kept_and_reused_so_a_busy_machine_cannot_flip_it(
    params, tmp_path, monkeypatch
):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, " ".join(BF16_FLAGS)))
    monkeypatch.setattr(precision, "MIN_STEP_FLOPS", 0)  # measure even the tiny test network
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    measured: list[int] = []
    real = precision.step_seconds

    def counted(model, batch):
        measured.append(batch)
        return real(model, batch)

    monkeypatch.setattr(precision, "step_seconds", counted)
    auto = train_variant(params, precision="auto")
    first = resolve_precision(auto, params.runtime, classifier(params), 32)
    assert measured == [32] and cache_path() == tmp_path / "cache" / "precision.json"
    # the same layers on this machine: the kept verdict, whatever the load is now
    for _ in range(3):
        assert resolve_precision(auto, params.runtime, classifier(params), 32) == first
    # a campaign's dropout or batch-norm momentum changes no layer: no new measurement
    calmer = tiny_model(params).model_copy(update={"dropout": 0.5, "batch_norm_momentum": 0.3})
    assert resolve_precision(auto, params.runtime, classifier(params, model=calmer), 32) == first
    assert measured == [32]
    # another network, or another batch, is measured on its own
    resolve_precision(auto, params.runtime, classifier(params, num_classes=7), 32)
    resolve_precision(auto, params.runtime, classifier(params), 16)
    assert measured == [32, 32, 16]
    # a damaged cache is measured again and rewritten, not trusted
    cache_path().write_text("{not json")
    resolve_precision(auto, params.runtime, classifier(params), 32)
    assert len(measured) == 4
    assert json.loads(cache_path().read_text())


def test_a_step_bound_by_overhead_trains_in_fp32_without_measuring(params, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "CPUINFO", _cpuinfo(tmp_path, " ".join(BF16_FLAGS)))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "step_seconds", None)  # calling it would raise
    auto = train_variant(params, precision="auto")
    assert resolve_precision(auto, params.runtime, classifier(params), 256) == "32-true"
    assert not cache_path().exists()  # nothing measured, nothing kept
