"""Output contracts: correct results pass; raw pixels, per-case values, wrong shapes, NaN, strings and
small cohorts are refused, with messages that name where but never quote what."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from datasite_setup.output_contracts import (
    AggregatesContract,
    ContractViolation,
    OutputContract,
    ScalarsContract,
    WeightsContract,
)

SECRET = "patient-0042-Jane-Doe"
SHAPES = {"conv1.weight": (8, 1, 3, 3), "conv1.bias": (8,)}


def _weights(**overrides: Any) -> dict[str, Any]:
    weights = {name: np.ones(shape, dtype=np.float32) for name, shape in SHAPES.items()}
    weights.update(overrides)
    return {"weights": weights, "scalars": {"loss": 0.25, "n_cases": 12}}


def _aggregates() -> dict[str, Any]:
    return {
        "scanner": {
            "GE": {"n": 7, "mean_volume": 12.5, "hist": np.arange(16), "edges": np.linspace(0, 1, 17)},
            "Siemens": {"n": 5, "mean_volume": 11.0, "by_sex": {"F": {"n": 5, "mean": 1.0}}},
        },
        "all": {"n": 12, "mean_volume": 11.9},
    }


def _refused(contract: OutputContract, result: Any) -> str:
    with pytest.raises(ContractViolation) as info:
        contract.check(result)
    message = str(info.value)
    assert SECRET not in message and "1234.5" not in message
    return message


def test_correct_results_are_accepted() -> None:
    ScalarsContract().check({"auc": 0.81, "n": 40, "dice.mean": 0.7})
    ScalarsContract(names={"auc", "loss"}).check({"auc": 0.9})
    WeightsContract(SHAPES, {"loss", "n_cases"}).check(_weights())
    AggregatesContract(min_cohort=5, max_array_len=64).check(_aggregates())
    AggregatesContract(min_cohort=5, max_array_len=64).check({})


@pytest.mark.parametrize(
    "result",
    [
        {"image": np.full((256, 256), 1234.5)},
        {"voxels": np.full(100, 1234.5)},
        {"auc": [0.8, 1234.5, 0.7]},
        {"auc": math.nan},
        {"auc": math.inf},
        {"who": SECRET},
        {"flag": True},
        {"auc": None},
        {"nested": {"auc": 1234.5}},
        [1234.5],
        {f"case_{i:03d}": 1234.5 for i in range(100)},
        {SECRET + " " * 70: 1.0},
    ],
)
def test_scalars_contract_refuses(result: Any) -> None:
    _refused(ScalarsContract(), result)


def test_declared_scalar_names_refuse_undeclared_keys_without_quoting_them() -> None:
    message = _refused(ScalarsContract(names={"auc"}), {"auc": 0.9, SECRET: 1234.5})
    assert message == "result has 1 undeclared entry (declared: 'auc')"


def test_weights_contract_names_the_wrong_shape() -> None:
    message = _refused(WeightsContract(SHAPES, {"loss", "n_cases"}), _weights(**{"conv1.weight": np.ones((3, 3), np.float32)}))
    assert message == "result['weights']['conv1.weight'] has shape (3, 3), the model declares (8, 1, 3, 3)"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["weights"].update({"conv1.bias": np.array([np.nan] * 8, np.float32)}), "NaN or infinite"),
        (lambda r: r["weights"].update({"conv1.bias": np.arange(8)}), "has dtype int64; a float array is required"),
        (lambda r: r["weights"].update({"conv1.bias": [1234.5] * 8}), "a list"),
        (lambda r: r["weights"].pop("conv1.bias"), "result['weights']['conv1.bias'] is missing"),
        (lambda r: r["weights"].update({SECRET: np.ones(3, np.float32)}), "result['weights'] has 1 undeclared entry"),
        (lambda r: r.update({"images": np.full((64, 64), 1234.5)}), "result has 1 undeclared entry"),
        (lambda r: r["scalars"].update({"loss": SECRET}), "result['scalars']['loss'] is a string"),
        (lambda r: r["scalars"].update({"loss": -math.inf}), "not a finite number"),
        (lambda r: r["scalars"].update({"per_case": [1234.5, 0.2]}), "result['scalars'] has 1 undeclared entry"),
        (lambda r: r.pop("scalars"), "result['scalars'] is missing"),
    ],
)
def test_weights_contract_refuses(mutate: Any, expected: str) -> None:
    result = _weights()
    mutate(result)
    assert expected in _refused(WeightsContract(SHAPES, {"loss", "n_cases"}), result)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["scanner"]["GE"].update({"n": 2}), "result[#0][#0] is a group smaller than the minimum cohort of 5"),
        (lambda r: r["scanner"]["Siemens"]["by_sex"].update({"M": {"n": 1, "mean": 1234.5}}), "smaller than the minimum"),
        (lambda r: r["scanner"]["GE"].update({"n": 7.0}), "an int is required"),
        (lambda r: r["scanner"]["GE"].update({"n": True}), "an int is required"),
        (lambda r: r["scanner"]["GE"].update({"slice": np.full((32, 32), 1234.5)}), "only 1-D arrays"),
        (lambda r: r["scanner"]["GE"].update({"hist": np.arange(65)}), "only 1-D arrays of at most 64"),
        (lambda r: r["scanner"]["GE"].update({"volumes": [1234.5, 3.0, 4.0]}), "a list"),
        (lambda r: r["scanner"]["GE"].update({"mean_volume": math.nan}), "not a finite number"),
        (lambda r: r["scanner"]["GE"].update({"edges": np.array([0.0, np.inf])}), "NaN or infinite"),
        (lambda r: r["scanner"]["GE"].update({"site": SECRET}), "a string"),
        (lambda r: r["scanner"].update({SECRET: 1234.5}), "outside any group"),
        (lambda r: r.update({"raw": np.full((8, 8), 1234.5)}), "outside any group"),
    ],
)
def test_aggregates_contract_refuses(mutate: Any, expected: str) -> None:
    result = _aggregates()
    mutate(result)
    assert expected in _refused(AggregatesContract(min_cohort=5, max_array_len=64), result)


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"n": 2**1024}, "not a finite number"),
        ({"n": 2**53 + 1}, "too large to be held exactly by a float"),
        ({"n": np.int64(2**60)}, "too large to be held exactly by a float"),
        ({"flag": np.bool_(True)}, "a number is required"),
        ({"a" * 33: 1.0}, "not a short identifier (at most 32 characters)"),
        ({7: 1.0}, "not a short identifier"),
        ({f"v{i}": 1.0 for i in range(17)}, "17 entries, at most 16"),
    ],
)
def test_scalars_carry_at_most_a_few_float64_values(result: Any, expected: str) -> None:
    assert expected in _refused(ScalarsContract(), result)


def test_declared_names_do_not_lift_the_count_or_the_name_rules() -> None:
    many = {f"v{i}": 1.0 for i in range(5)}
    assert "at most 4" in _refused(ScalarsContract(names=set(many), max_items=4), many)
    long_name = "x" * 40
    assert "short identifier" in _refused(ScalarsContract(names={long_name}), {long_name: 1.0})


def test_scalars_leave_as_python_floats() -> None:
    contract = ScalarsContract(names={"n", "mean", "sd"})
    result = {"n": 40, "mean": np.float32(0.5), "sd": np.float64(0.25)}
    contract.check(result)
    released = contract.as_floats(result)
    assert released == {"n": 40.0, "mean": 0.5, "sd": 0.25}
    assert all(type(v) is float for v in released.values())
    contract.check({"n": 2**53})
