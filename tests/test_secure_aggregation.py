"""Secure aggregation: the data scientist reads only the sum of the sites' updates.

The arithmetic and the keys in process; the orchestrator against simulated sites that run the
sites' own checks and masks (a sum equal to plain FedAvg's, a dropped site failing the round
safely and the rerun resuming); and three sites' boundary (`run_request`: the isolated child, the
session checks, the masking) with a data scientist who forges a peer's key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyses.federation.orchestrator import Orchestrator, RoundFailed, TrainingPlan
from analyses.federation.simulated_site import SimulatedSite, pin_each_other, with_splits
from datasite_setup.secure_aggregation import masks
from datasite_setup.secure_aggregation.keys import PeerKeyRefused, SiteKeys
from datasite_setup.secure_aggregation.sessions import SessionLedger, SessionRefused
from tests.test_federation_strategies import FaultySite, phantom_cases

DS = "ds@uni.example"
SITES = ("hospital-a", "hospital-b", "hospital-c")


def three_keys() -> tuple[dict[str, SiteKeys], dict[str, str]]:
    keys = {name: SiteKeys(name, os.urandom(32)) for name in SITES}
    return keys, {name: key.identity_public() for name, key in keys.items()}


def test_the_masks_cancel_in_the_sum_and_one_masked_update_says_nothing_of_its_values() -> None:
    keys, pinned = three_keys()
    relayed = {name: key.session_key(DS, "s1") for name, key in keys.items()}
    rng = np.random.default_rng(0)
    values = {name: {"w": rng.normal(0, 1, (200, 50)), "b": rng.normal(0, 1, 7)} for name in SITES}
    hidden = {name: masks.masked(masks.encode(values[name]), "s1", name,
                                 key.shared_secrets(DS, "s1", relayed, {p: k for p, k in pinned.items() if p != name}))
              for name, key in keys.items()}
    total = None
    for name in SITES:
        total = masks.add(total, hidden[name])
    summed = masks.decode(total)
    for array in ("w", "b"):
        np.testing.assert_allclose(summed[array], sum(values[n][array] for n in SITES), atol=3 * 2**-24)
    one = hidden["hospital-a"]["w"].ravel()
    assert abs(np.corrcoef(one.view(np.int64).astype(float), values["hospital-a"]["w"].ravel())[0, 1]) < 0.05
    assert (one >> np.uint64(63)).mean() == pytest.approx(0.5, abs=0.03)  # the top bit is a coin flip
    with pytest.raises(masks.EncodingRange, match="'w' holds a value outside"):
        masks.encode({"w": np.array([np.inf])})


def test_a_key_the_data_scientist_substitutes_or_replays_is_refused() -> None:
    keys, pinned = three_keys()
    relayed = {name: key.session_key(DS, "s1") for name, key in keys.items()}
    a = keys["hospital-a"]
    others = {p: k for p, k in pinned.items() if p != "hospital-a"}
    assert set(a.shared_secrets(DS, "s1", relayed, others)) == {"hospital-b", "hospital-c"}
    forged = SiteKeys("hospital-b", os.urandom(32)).session_key(DS, "s1")  # her own key, signed by her own identity
    with pytest.raises(PeerKeyRefused, match="'hospital-b' is not signed by its pinned identity"):
        a.shared_secrets(DS, "s1", {**relayed, "hospital-b": forged}, others)
    replayed = keys["hospital-b"].session_key(DS, "s0")  # a genuine key of another session
    with pytest.raises(PeerKeyRefused, match="'hospital-b' is not signed"):
        a.shared_secrets(DS, "s1", {**relayed, "hospital-b": replayed}, others)
    with pytest.raises(PeerKeyRefused, match="not the one this site handed out"):
        a.shared_secrets(DS, "s1", {**relayed, "hospital-a": relayed["hospital-b"]}, others)
    with pytest.raises(PeerKeyRefused, match="'hospital-x' is not a peer"):
        a.shared_secrets(DS, "s1", {**relayed, "hospital-x": relayed["hospital-b"]}, others)


def test_a_session_masks_once_and_the_same_weights_keep_their_participants(tmp_path: Path) -> None:
    ledger = SessionLedger.at_site(tmp_path)
    ledger.record(DS, "s1", "w1", ["a", "b", "c"])
    assert "was used before" in ledger.problem(DS, "s1", "w2", ["a", "b", "c"])
    assert "masked before for other participants (a, b, c)" in ledger.problem(DS, "s2", "w1", ["a", "b"])
    assert ledger.problem(DS, "s2", "w1", ["c", "b", "a"]) is None  # a round redone with the same sites
    assert ledger.problem("other@uni.example", "s1", "w1", ["a", "b"]) is None
    with pytest.raises(SessionRefused):
        SessionLedger.at_site(tmp_path).record(DS, "s1", "w3", ["a", "b", "c"])  # after a restart too


def fleet(faulty: dict[str, set[int]] | None = None) -> list[SimulatedSite]:
    faulty = faulty or {}
    return [FaultySite(name, with_splits(phantom_cases(name, 4, seed)), fail_calls=faulty.get(name, set()))
            for seed, name in enumerate(SITES)]


def test_a_secure_federation_trains_as_plain_fedavg_and_a_dropped_site_fails_the_round_safely(tmp_path: Path) -> None:
    plan = TrainingPlan(domain="brain_mr_tumour_burden", strategy="fedavg", rounds=2, batch_size=8, lr=1e-2, min_sites=3)
    plain = Orchestrator(plan, fleet(), tmp_path / "plain", progress=False).run()
    secure_plan = TrainingPlan(**{**plan.__dict__, "secure_aggregation": True})
    assert secure_plan.budgets(3)["secure_aggregation_key"] == secure_plan.budgets(3)["local_train"]
    secure = Orchestrator(secure_plan, pin_each_other(fleet()), tmp_path / "secure", progress=False).run()
    for name, value in plain.final_state["global"].items():
        np.testing.assert_allclose(secure.final_state["global"][name], value, atol=1e-6)
    assert secure.history[1]["aggregated"] == ["secure-sum"]

    dropping = pin_each_other(fleet({"hospital-b": {2}}))  # hospital-b's second training call fails
    with pytest.raises(RoundFailed, match="round 2: the secure-aggregation session cannot be unmasked"):
        Orchestrator(secure_plan, dropping, tmp_path / "dropped", progress=False).run()
    resumed = Orchestrator(secure_plan, dropping, tmp_path / "dropped", progress=False).run()
    assert resumed.resumed_from == 1
    for name, value in plain.final_state["global"].items():
        np.testing.assert_allclose(resumed.final_state["global"][name], value, atol=1e-6)

    with pytest.raises(ValueError, match="fedbn needs more"):
        TrainingPlan(domain="brain_mr_segmentation", strategy="fedbn", rounds=1, secure_aggregation=True)


def site_configs(tmp_path: Path) -> dict[str, Any]:
    from datasite_setup.credentials import secure_aggregation_seed
    from datasite_setup.site_config import load_site_config
    from tests.conftest import write_site_config

    plain = {name: load_site_config(write_site_config(tmp_path / name, name, 8081, min_cohort=1)) for name in SITES}
    identities = {name: SiteKeys(name, secure_aggregation_seed(config)).identity_public() for name, config in plain.items()}
    configs = {}
    for name in SITES:
        peers = ", ".join(f'{peer} = "{key}"' for peer, key in identities.items() if peer != name)
        extra = f"[secure_aggregation]\npeers = {{ {peers} }}\nmin_participants = 3\n"
        configs[name] = load_site_config(write_site_config(tmp_path / name, name, 8081, min_cohort=1, extra=extra))
    return configs


def test_three_sites_mask_at_their_boundary_and_refuse_what_would_unmask_one(tmp_path: Path) -> None:
    from datasite_setup.model_weights import exchanged_weights
    from datasite_setup.site_execution import SiteRefusal, run_request
    from datasite_setup.site_tasks import run_installed_task
    from domains import get_domain
    from tests.test_disclosure import thin_code

    configs = site_configs(tmp_path)
    cases = {name: with_splits(phantom_cases(name, 3, seed, slices=4, matrix=16)) for seed, name in enumerate(SITES)}
    domain = get_domain("brain_mr_tumour_burden")
    # plain SGD, so that the child's and this process's float rounding stay apart by rounding only
    # (Adam turns a near-zero gradient's rounding into a step of lr either way)
    params = {"domain": domain.name, "weights": exchanged_weights(domain.build_model()), "epochs": 1, "batch_size": 8,
              "lr": 1e-2, "optimizer": "sgd", "seed": 0, "split": "all"}
    with pytest.raises(SiteRefusal, match="releases model updates only masked for secure aggregation"):
        run_request(configs["hospital-a"], thin_code("local_train"), {"cases": cases["hospital-a"], "params": params}, DS)
    relayed = {name: run_request(config, thin_code("secure_aggregation_key"), {"cases": cases[name], "params": {"session": "s1"}}, DS)
               for name, config in configs.items()}
    forged = {**relayed, "hospital-b": SiteKeys("hospital-b", os.urandom(32)).session_key(DS, "s1")}
    with pytest.raises(SiteRefusal, match="'hospital-b' is not signed by its pinned identity"):
        run_request(configs["hospital-a"], thin_code("local_train"),
                    {"cases": cases["hospital-a"], "params": {**params, "secure_aggregation": {"session": "s1", "peers": forged}}}, DS)
    session = {"session": "s1", "peers": relayed}
    masked = {name: run_request(config, thin_code("local_train"),
                                {"cases": cases[name], "params": {**params, "secure_aggregation": session}}, DS)
              for name, config in configs.items()}
    total, count = None, 0.0
    for result in masked.values():
        assert all(value.dtype == np.uint64 for value in result["weights"].values())
        total, count = masks.add(total, result["weights"]), count + result["scalars"]["n_samples"]
    mean = {name: value / count for name, value in masks.decode(total).items()}
    plain = {name: run_installed_task("local_train", cases[name], params, min_cohort=1, min_batch=8) for name in SITES}
    n = {name: plain[name]["scalars"]["n_samples"] for name in SITES}
    for weight in mean:
        expected = sum(n[s] * plain[s]["weights"][weight].astype(np.float64) for s in SITES) / sum(n.values())
        np.testing.assert_allclose(mean[weight], expected, atol=1e-4)
    with pytest.raises(SiteRefusal, match="session 's1' was used before"):
        run_request(configs["hospital-a"], thin_code("local_train"),
                    {"cases": cases["hospital-a"], "params": {**params, "secure_aggregation": session}}, DS)
    two = {name: relayed[name] for name in ("hospital-a", "hospital-b")}
    with pytest.raises(SiteRefusal, match="needs at least 3 sites, this one has 2"):
        run_request(configs["hospital-a"], thin_code("local_train"),
                    {"cases": cases["hospital-a"], "params": {**params, "secure_aggregation": {"session": "s2", "peers": two}}}, DS)
