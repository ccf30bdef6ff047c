"""The server: every method of the registry by name on the same trained clients (tiny preset)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from fedmitr.config import preset_config
from fedmitr.errors import ConfigError
from fedmitr.events import Metric, Progress, SyntheticRound
from fedmitr.methods import METHODS, run_method
from fedmitr.server import MethodResult, ServerContext

TINY = preset_config("tiny")


@pytest.fixture(scope="module")
def context(ensemble, tiny_data):
    def make(on_event=lambda e: None, cfg=TINY):
        return ServerContext(cfg, tiny_data, ensemble, torch.device("cpu"), on_event=on_event)

    return make


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_end_to_end(name, context):
    events = []
    result = run_method(name, context(events.append))
    spec = METHODS[name]
    assert isinstance(result, MethodResult) and result.name == name
    assert 0 <= result.accuracy <= 1 and result.seconds > 0
    assert (result.model is not None) == spec.makes_model
    entry = result.to_dict()
    if not spec.synthesises:
        assert entry == {"accuracy": result.accuracy, "seconds": result.seconds} and events == []
        return
    rounds, images = TINY.distill.rounds, TINY.inversion.images_per_round
    assert len(result.curve) == rounds and result.accuracy == result.curve[-1]
    assert result.synthetic_images == rounds * images
    assert set(result.stage_seconds) == {"inversion", "relabel", "distill", "evaluate"}
    assert result.patches == 16 and (result.active_patches < 16) == spec.sparse
    assert set(result.final_losses) == ({"kd", "token", "total"} if spec.relabel else {"kd", "total"})
    assert set(entry) >= {"curve", "stage_seconds", "synthetic_images", "active_patches", "final_losses"}

    # The events: a progress step per inversion iteration and distillation step, one synthetic
    # round and one curve point per round.
    steps = [e for e in events if isinstance(e, Progress) and "relabel" not in e.message]
    per_round = spec.inversion.iterations(TINY) + TINY.distill.steps_per_round
    assert [e.step for e in steps] == list(range(1, rounds * per_round + 1))
    assert all(e.total == rounds * per_round and e.stage == name for e in steps)
    synthetic = [e for e in events if isinstance(e, SyntheticRound)]
    assert [e.round for e in synthetic] == list(range(1, rounds + 1))
    relabel_steps = [e for e in events if isinstance(e, Progress) and "relabel" in e.message]
    relabelled = any(e.token_relabelled.any() for e in synthetic)  # none when H is the whole kept set
    assert bool(relabel_steps) == (relabelled and spec.configure(TINY).relabel.mode == "neighbourhood")
    curve = [e for e in events if isinstance(e, Metric)]
    assert [(e.source, e.step, e.value) for e in curve] == [(name, r + 1, a) for r, a in enumerate(result.curve)]
    last = synthetic[-1]
    assert last.images.shape == (images, 1, 28, 28) and last.images.dtype == np.uint8
    np.testing.assert_allclose(last.density.sum(1), 1, rtol=1e-5)
    kept = last.stop_step < 0
    assert (last.token_relabelled == (kept & ~last.high_mask if spec.relabel else False)).all()
    assert not (last.high_mask & ~kept).any()  # H never holds a stopped patch
    assert (last.token_source is not None) == spec.relabel
    assert ((last.stop_step >= 0).any(axis=1)).all() == spec.sparse


def test_a_method_is_deterministic_for_a_seed(context):
    a = run_method("fedmitr", context())
    b = run_method("fedmitr", context())
    assert a.curve == b.curve and a.final_losses == b.final_losses


def test_equal_time_override_changes_only_the_images_per_round(context):
    result = run_method("sparse-kd", context().with_images_per_round(3))
    assert result.synthetic_images == 3 * TINY.distill.rounds


def test_unknown_method_is_a_clear_error(context):
    with pytest.raises(ConfigError, match="unknown method 'magic'; known: fedavg, ensemble"):
        run_method("magic", context())


@pytest.fixture()
def registry():
    """Methods registered inside a test are gone after it."""
    before = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(before)


def test_a_registered_toy_method_runs_end_to_end_by_name(context, registry):
    """A new variant is one registration: here a method that keeps only the first client."""
    from dataclasses import dataclass

    from fedmitr.ensemble import Ensemble
    from fedmitr.methods import Method, register_method


    @dataclass(frozen=True, kw_only=True)
    class FirstClient(Method):
        def run(self, ctx):
            model = ctx.ensemble.models[0]
            return MethodResult(self.name, Ensemble([model]).evaluate(ctx.dataset.test), model=model)

    @register_method
    def first_client():
        return FirstClient(name="first-client", label="client 1", colour="#123456", role="baseline",
                           summary="the first client's own model")

    assert "first-client" in METHODS
    ctx = context()
    result = run_method("first-client", ctx)
    assert result.accuracy == Ensemble([ctx.ensemble.models[0]]).evaluate(ctx.dataset.test) and result.seconds > 0
    cfg = TINY.__class__(**{**TINY.__dict__, "methods": ("fedavg", "first-client")}).validate()  # the config knows it
    assert cfg.methods == ("fedavg", "first-client")


def test_a_rounds_variant_is_one_registration(context, registry):
    from fedmitr.methods import ModelInversion, Rounds, TokenRelabel, register_method

    @register_method
    def fedmitr_image():
        return Rounds(name="fedmitr-image", label="FedMITR, image relabel", colour="#b5179e", role="ablation",
                      summary="sparse inversion + image-level relabel", inversion=ModelInversion(sparse=True),
                      targets=TokenRelabel(mode="image"))

    events = []
    result = run_method("fedmitr-image", context(events.append))
    assert len(result.curve) == TINY.distill.rounds and result.active_patches < result.patches
    synthetic = [e for e in events if isinstance(e, SyntheticRound)]
    # The image-level relabel gives every kept low-density patch of an image the same label.
    low = ~synthetic[-1].high_mask[0] & (synthetic[-1].stop_step[0] < 0)
    assert len(set(synthetic[-1].token_labels[0][low].tolist())) == 1


def test_registration_refuses_a_taken_or_malformed_name(registry):
    from fedmitr.methods import FedAvg, register_method

    with pytest.raises(ConfigError, match="already registered"):
        register_method(lambda: FedAvg(name="fedavg", label="x", colour="#000000", role="baseline", summary="x"))
    with pytest.raises(ConfigError, match="lower-case"):
        register_method(lambda: FedAvg(name="Bad Name", label="x", colour="#000000", role="baseline", summary="x"))
    with pytest.raises(ConfigError, match="role must be one of"):
        register_method(lambda: FedAvg(name="odd", label="x", colour="#000000", role="hero", summary="x"))


def test_token_weight_zero_gives_exactly_sparse_kds_global_model(ensemble, tiny_data):
    """The control: with the token loss weighed 0, FedMITR on the plain ensemble (fedmitr-unweighted)
    is sparse-kd, bit for bit. Relabel adds a loss and nothing else (no other draw, no other image, no
    other step)."""
    cfg = TINY.__class__(**{**TINY.__dict__, "distill": TINY.distill.__class__(
        **{**TINY.distill.__dict__, "token_weight": 0.0, "token_view": "full", "mixtoken": 0.0,
           "aux_detach": False})})
    ctx = ServerContext(cfg, tiny_data, ensemble, torch.device("cpu"))
    sparse, ours = run_method("sparse-kd", ctx), run_method("fedmitr-unweighted", ctx)
    assert sparse.curve == ours.curve
    theirs, mine = sparse.model.state_dict(), ours.model.state_dict()
    assert all(torch.equal(theirs[k], mine[k]) for k in theirs)
    assert np.array_equal(sparse.synthetic.images, ours.synthetic.images)
    assert "token" in ours.final_losses  # the token loss was computed, and weighed 0


def test_the_relabel_diagnostics_reach_the_method_result(context):
    result = run_method("fedmitr", context())
    d = result.relabel
    assert d["high_kept_share"] == 1.0 and 0 < d["kept_share"] < 1
    assert set(d["taught"]) == {"label", "relabel", "gated", "background", "nothing"}
    assert sum(d["label_histogram"]) == result.synthetic_images
    assert result.to_dict()["relabel"] == d
    assert run_method("sparse-kd", context()).relabel.keys() == {"high_kept_share", "kept_share", "label_histogram"}


def test_the_default_relabels_part_of_the_kept_patches_and_h_the_kept_set_relabels_nothing(context):
    """The default H is the top 20% of the patches, so the kept patches outside it get ensemble
    relabels and the stopped ones the background's label; with H the kept set (the earlier default)
    every kept patch keeps y and nothing is relabelled."""
    from fedmitr.config import apply_overrides

    default = run_method("fedmitr", context()).relabel
    assert default["taught"]["relabel"] > 0 and default["relabelled_kept_patches"] > 0
    assert default["taught"]["label"] + default["taught"]["relabel"] == pytest.approx(default["kept_share"])
    assert default["taught"]["background"] == pytest.approx(1 - default["kept_share"])
    assert default["high_kept_share"] == 1.0
    kept_set = run_method("fedmitr", context(cfg=apply_overrides(TINY, {"relabel": {"high_ratio": None}}))).relabel
    assert kept_set["taught"]["relabel"] == 0 and kept_set["relabelled_kept_patches"] == 0
    assert kept_set["taught"]["label"] == pytest.approx(kept_set["kept_share"])
    assert run_method("fedmitr-keptview", context()).relabel["taught"]["relabel"] == 0


# The earlier default (noise in stopped patches, kept view, H = the kept set) on the tiny preset's
# clients, as measured before the whole-image default (1 torch thread, conftest).
EARLIER_DEFAULT = {"curve": [0.1899999976158142, 0.17499999701976776],
                   "losses": {"kd": 0.029399534687399864, "token": 1.8821300268173218, "total": 0.9704645276069641}}


def test_the_earlier_default_is_reachable_by_name_and_gives_its_numbers(context, ensemble, tiny_data):
    old = run_method("fedmitr-keptview", context())
    assert old.curve == pytest.approx(EARLIER_DEFAULT["curve"], abs=1e-6)
    assert old.final_losses == pytest.approx(EARLIER_DEFAULT["losses"], rel=1e-4)
    # ... and it is exactly FedMITR on the plain ensemble run with the earlier settings.
    from fedmitr.config import apply_overrides

    cfg = apply_overrides(TINY, {"inversion": {"stopped_fill": "noise"}, "distill": {"view": "kept", "aux_detach": False},
                                 "relabel": {"high_ratio": 1.0, "stopped": "ignore", "mode": "neighbourhood"}})
    same = run_method("fedmitr-unweighted", ServerContext(cfg, tiny_data, ensemble, torch.device("cpu")))
    assert same.curve == old.curve and same.final_losses == old.final_losses


@pytest.mark.parametrize("fill, stored", [("black", 0), ("mean", None)])
def test_a_stored_synthetic_image_holds_the_fill_in_its_stopped_patches(ensemble, tiny_data, fill, stored):
    from fedmitr.config import apply_overrides

    cfg = apply_overrides(TINY, {"inversion": {"stopped_fill": fill}})
    result = run_method("fedmitr", ServerContext(cfg, tiny_data, ensemble, torch.device("cpu")))
    images, stop_step = result.synthetic.images, result.synthetic.stop_step  # uint8 [P, 1, 28, 28], [P, 16]
    stopped = np.repeat(np.repeat((stop_step >= 0).reshape(-1, 1, 4, 4), 7, 2), 7, 3)
    if stored is None:  # the data's mean pixel, as the run directory stores it
        stored = int(np.clip(tiny_data.mean[0], 0, 1) * 255 + 0.5)
    assert stopped.any() and (images[stopped] == stored).all()
    assert (images[~stopped] != stored).any()


def test_the_student_average_is_what_a_run_evaluates_and_returns(context, tiny_data):
    from fedmitr.config import apply_overrides
    from fedmitr.ensemble import Ensemble

    plain = run_method("sparse-kd", context())
    nearly_none = run_method("sparse-kd", context(cfg=apply_overrides(TINY, {"distill": {"ema": 1e-9}})))
    assert nearly_none.curve == plain.curve  # an average that forgets at once is the student itself
    averaged = run_method("sparse-kd", context(cfg=apply_overrides(TINY, {"distill": {"ema": 0.9}})))
    assert Ensemble([averaged.model]).evaluate(tiny_data.test) == averaged.accuracy
    a, b = averaged.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in b)
