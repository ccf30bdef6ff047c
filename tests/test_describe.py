"""What a run says its method did comes from the run itself: never a relabel it did not make."""

from __future__ import annotations

import torch

from fedmitr.config import apply_overrides, preset_config
from fedmitr.methods import METHODS, run_method
from fedmitr.server import ServerContext

TINY = preset_config("tiny")


def _run(name, ensemble, tiny_data, **overrides):
    cfg = apply_overrides(TINY, overrides)
    return cfg, run_method(name, ServerContext(cfg, tiny_data, ensemble, torch.device("cpu")))


def test_a_run_that_relabels_nothing_never_claims_a_relabel(ensemble, tiny_data):
    cfg, result = _run("fedmitr", ensemble, tiny_data, relabel={"high_ratio": 1.0})
    assert result.relabel["taught"]["relabel"] == 0
    text = METHODS["fedmitr"].describe(cfg, result.relabel)
    assert "no patch was relabelled" in text and "relabelled by the ensemble" not in text
    from fedmitr.relabel import diagnostics_text

    summary = diagnostics_text(result.relabel)  # the app's summary under the relabel map, and the card's
    assert "No patch was relabelled in this run" in summary and "% relabel" not in summary
    assert "filled with the data's background" in text and "sees whole images" in text


def test_a_run_that_relabels_says_how_much(ensemble, tiny_data):
    cfg, result = _run("fedmitr", ensemble, tiny_data, relabel={"high_ratio": 0.2})
    share = result.relabel["taught"]["relabel"]
    assert share > 0
    text = METHODS["fedmitr"].describe(cfg, result.relabel)
    assert f"relabelled by the ensemble ({share:.0%})" in text
    from fedmitr.relabel import diagnostics_text

    assert "No patch was relabelled" not in diagnostics_text(result.relabel)


def test_the_description_follows_the_methods_own_stages():
    text = METHODS["fedmitr-keptview"].describe(TINY)
    assert "keep the noise" in text and "only the patches inversion kept" in text and "nothing is relabelled" in text
    assert "class token alone" in METHODS["dense-kd"].describe(TINY) and "dense model inversion" in METHODS[
        "dense-kd"].describe(TINY)
    assert "background" in METHODS["fedmitr"].describe(apply_overrides(TINY, {"relabel": {"stopped": "blank"}}))


def test_the_model_card_says_what_the_run_did(tiny_cfg, tmp_path):
    """A run whose FedMITR relabels nothing gets a card that says so, and no relabel claim."""
    import dataclasses

    from fedmitr import hub
    from fedmitr.pipeline import run

    cfg = apply_overrides(dataclasses.replace(tiny_cfg, methods=("fedmitr",)), {"relabel": {"high_ratio": 1.0}})
    run(cfg, out_dir=tmp_path / "run")
    text = (hub.export(tmp_path / "run", tmp_path / "export", method="fedmitr") / "README.md").read_text()
    assert "no patch was relabelled in this run" in text
    assert "relabelled by the ensemble" not in text and "are relabelled" not in text
