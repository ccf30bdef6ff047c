"""Token targets that teach classes: the stopped patches' image target, the aux head on stop-gradient
features, MixToken, Token Labeling's vote, the readouts, the gradient probes and their way to the
run directory, the shared checkpoint, `fedmitr eval` and the model card."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import yaml

from fedmitr import hub
from fedmitr.cli import main
from fedmitr.config import apply_overrides, preset_config
from fedmitr.data import Split
from fedmitr.distill import (GlobalModel, PoolTensors, gradient_variance, mix_images, readouts, sample_mixtoken,
                             step_losses)
from fedmitr.errors import ConfigError
from fedmitr.inversion import SyntheticBatch, gradient_spread
from fedmitr.knobs import config_from_knobs
from fedmitr.methods import METHODS, V5_SETTINGS
from fedmitr.models import build_model, vote_logits
from fedmitr.pipeline import run
from fedmitr.relabel import BACKGROUND, PatchScores, relabel

TINY = preset_config("tiny")


def _pool(n: int = 12) -> PoolTensors:
    keep = torch.zeros(n, 16, dtype=torch.bool)
    for row in keep:
        row[torch.randperm(16)[:6]] = True
    return PoolTensors(images=torch.randn(n, 1, 28, 28), keep_mask=keep, kept=6,
                       targets=torch.softmax(torch.randn(n, 16, 10), -1), weights=torch.ones(n, 16))


def _student(seed: int = 0, **kwargs) -> GlobalModel:
    torch.manual_seed(seed)
    return GlobalModel(build_model(TINY.model, 10, 1, 28), 10, **kwargs)


def test_stopped_patches_can_teach_their_own_images_soft_label_at_a_lower_weight(ensemble):
    b, n = 4, 16
    keep_idx = torch.stack([torch.randperm(n)[:6].sort().values for _ in range(b)])
    stop_step = torch.full((b, n), 3).scatter_(1, keep_idx, -1)
    batch = SyntheticBatch(images=torch.randn(b, 1, 28, 28), labels=torch.arange(b), keep_idx=keep_idx,
                           stop_step=stop_step, iterations=10, seconds=0.0)
    high = torch.zeros(b, n, dtype=torch.bool).scatter_(1, keep_idx[:, :2], True)
    scores = PatchScores(density=torch.rand(b, n), high_mask=high)
    cfg = replace(TINY.relabel, stopped="image", stopped_weight=0.3, mode="image")
    targets = relabel(ensemble, batch, scores, cfg, num_classes=10)
    stopped = stop_step >= 0
    with torch.no_grad():
        expected = F.softmax(ensemble(batch.images, keep_idx).logits, -1)  # each image on its kept view
    for i in range(b):
        rows = targets.targets[i][stopped[i]]
        torch.testing.assert_close(rows, expected[i].expand_as(rows))
    assert torch.all(targets.weights[stopped] == 0.3) and torch.all(targets.source[stopped] == BACKGROUND)
    assert torch.all(targets.weights[~stopped] == 1.0)  # kept patches keep their weight
    none = relabel(ensemble, batch, scores, replace(cfg, stopped_weight=0.0), num_classes=10)
    assert torch.all(none.weights[stopped] == 0)  # weight 0: the stopped patches teach nothing


def test_a_detached_aux_head_learns_from_the_token_loss_without_moving_the_backbone(ensemble):
    cfg = replace(TINY, distill=replace(TINY.distill, shift_px=0))
    pool = _pool()
    grads = {}
    for detach in (False, True):
        student = _student(aux_detach=detach)
        _, loss_tok = step_losses(student, ensemble, pool, torch.arange(12), cfg=cfg,
                                  generator=torch.Generator().manual_seed(0))
        loss_tok.backward()
        grads[detach] = (student.vit.blocks[0].attn.qkv.weight.grad, student.aux_head.weight.grad)
    assert grads[False][0] is not None and grads[False][0].abs().sum() > 0  # pulls the backbone
    assert grads[True][0] is None  # detached: no gradient reaches the backbone
    assert grads[True][1].abs().sum() > 0  # ... while the aux head still learns


def test_mixtoken_swaps_a_box_of_whole_patches_with_the_partner_image():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, 1, 28, 28)
    for _ in range(20):
        box = sample_mixtoken(4, gen, torch.device("cpu"))
        assert 0 < box.area <= 1 and box.area == pytest.approx(float(box.patches.float().mean()))
        mixed = mix_images(images, box, patch=7)
        patches = mixed.unfold(2, 7, 7).unfold(3, 7, 7).reshape(4, 16, -1)
        source = images.unfold(2, 7, 7).unfold(3, 7, 7).reshape(4, 16, -1)
        torch.testing.assert_close(patches[:, box.patches], source.flip(0)[:, box.patches])
        torch.testing.assert_close(patches[:, ~box.patches], source[:, ~box.patches])


@pytest.mark.parametrize("teacher", ["mixed", "area"])
def test_mixtoken_steps_differ_from_plain_steps_and_keep_each_patch_s_target(ensemble, teacher):
    cfg = apply_overrides(TINY, {"distill": {"shift_px": 0, "mixtoken": 1.0, "mixtoken_teacher": teacher}})
    plain = apply_overrides(TINY, {"distill": {"shift_px": 0, "mixtoken": 0.0}})
    pool = _pool()
    # Every patch's target is its own one-hot class: a patch of image i teaches class i % 10.
    pool = dataclasses.replace(pool, targets=F.one_hot(torch.arange(12) % 10, 10).float()[:, None].expand(-1, 16, -1))
    losses = {}
    for name, c in (("mix", cfg), ("plain", plain)):
        student = _student()
        losses[name] = step_losses(student, ensemble, pool, torch.arange(12), cfg=c,
                                   generator=torch.Generator().manual_seed(0))
    assert not torch.isclose(losses["mix"][0], losses["plain"][0])
    assert torch.isfinite(losses["mix"][0]) and torch.isfinite(losses["mix"][1])


def test_the_vote_and_the_readouts_agree_and_a_silent_aux_head_changes_nothing(tiny_data):
    student = _student()
    split = Split(tiny_data.test.images[:64], tiny_data.test.labels[:64])
    read = readouts(student.vit, student.aux_head, split, votes=(0.5,))
    assert set(read) == {"cls", "aux_max", "aux_mean", "vote"}
    logits = vote_logits(student.vit.eval(), student.aux_head, split.images, 0.5)
    assert read["vote"]["0.5"] == pytest.approx(float((logits.argmax(1) == split.labels).float().mean()))
    silent = torch.nn.Linear(student.aux_head.in_features, 10)
    torch.nn.init.zeros_(silent.weight), torch.nn.init.zeros_(silent.bias)
    torch.testing.assert_close(vote_logits(student.vit, silent, split.images, 2.0),
                               vote_logits(student.vit, silent, split.images, 0.0))


def test_gradient_variance_measures_the_token_loss_only_where_it_reaches_the_backbone(ensemble):
    pool = _pool()
    cfg = replace(TINY, distill=replace(TINY.distill, shift_px=1))
    shared = gradient_variance(_student(), ensemble, pool, cfg=cfg, minibatches=6, seed=0)
    detached = gradient_variance(_student(aux_detach=True), ensemble, pool, cfg=cfg, minibatches=6, seed=0)
    assert set(shared) == {"kd", "kd+token"}
    assert shared["kd"]["variance"] > 0 and shared["kd+token"]["variance"] != shared["kd"]["variance"]
    assert detached["kd+token"] == detached["kd"]  # the detached token loss moves no backbone weight
    assert shared["kd"] == pytest.approx(detached["kd"])  # same draws: the KD part is the same


def test_gradient_spread_reads_the_iterations_after_the_last_stop():
    steady = torch.ones(10, 4)
    steady[:3] = 5.0  # a jumpy start, before the last stop at iteration 3
    batch = SyntheticBatch(images=torch.zeros(4, 1, 2, 2), labels=torch.zeros(4), keep_idx=torch.zeros(4, 1),
                           stop_step=torch.zeros(4, 1), iterations=10, seconds=0.0, grad_norms=steady)
    spread = gradient_spread([batch], [1, 3])
    assert spread["over_iterations"] == 0 and spread["over_images"] == 0 and spread["from_iteration"] == 4
    assert gradient_spread([batch], [])["over_iterations"] > 0
    assert gradient_spread([], [1]) is None


@pytest.mark.parametrize("values, message", [
    ({"vote": 11}, "vote must be in [0, 10] (got 11.0)"),
    ({"vote": -1}, "vote must be >= 0 (got -1)"),
    ({"mixtoken": 1.5}, "mixtoken must be in [0, 1] (got 1.5)"),
    ({"stopped": "noise"}, "stopped must be one of ignore, uniform, blank, image (got 'noise')"),
])
def test_the_new_knobs_are_refused_with_one_line_naming_them(values, message):
    with pytest.raises(ConfigError) as err:
        config_from_knobs({"preset": "tiny", **values})
    (name,) = values
    assert err.value.setting == name and f"{name} {err.value.problem}".startswith(message)


def test_a_refused_vote_flag_is_one_line_naming_the_flag(tmp_path, capsys):
    assert main(["run", "--preset", "tiny", "--vote", "11", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmitr: error: --vote must be in [0, 10]") and len(err.strip().splitlines()) == 1


def test_the_earlier_default_is_pinned_by_name_whatever_the_defaults_become():
    moved = apply_overrides(TINY, {"relabel": {"stopped": "ignore", "mode": "token"},
                                   "distill": {"vote": 3.0, "aux_detach": True}})
    pinned = METHODS["fedmitr-v5"].configure(moved)
    assert pinned.relabel.stopped == V5_SETTINGS["relabel"]["stopped"] and pinned.relabel.mode == "neighbourhood"
    assert pinned.distill.vote == 0 and not pinned.distill.aux_detach
    # Without token targets there is no vote and no MixToken, whatever the run asks.
    kd = METHODS["sparse-kd"].configure(apply_overrides(TINY, {"distill": {"vote": 1.0, "mixtoken": 1.0}}))
    assert kd.distill.vote == 0 and kd.distill.mixtoken == 0


@pytest.fixture(scope="module")
def voted_run(tiny_cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("vote") / "run"
    cfg = apply_overrides(tiny_cfg, {"methods": "fedavg,ensemble,sparse-kd,fedmitr",
                                     "relabel": {"stopped": "image", "stopped_weight": 0.5},
                                     "distill": {"aux_detach": True, "vote": 0.5}})
    run(cfg, out_dir=out)
    return out


def test_a_voting_run_records_every_readout_and_the_gradient_claims(voted_run):
    metrics = json.loads((voted_run / "metrics.json").read_text())
    entry = metrics["methods"]["fedmitr"]
    assert entry["vote"] == 0.5 and entry["accuracy"] == pytest.approx(entry["vote_accuracy"]["0.5"])
    assert entry["curve"][-1] == entry["accuracy"]
    assert set(entry["aux_accuracy"]) == {"max", "mean"} and 0 <= entry["aux_accuracy"]["max"] <= 1
    assert set(entry["gradient_variance"]["distill"]) == {"kd", "kd+token"}
    assert entry["gradient_variance"]["inversion"]["over_iterations"] >= 0
    kd = metrics["methods"]["sparse-kd"]
    assert "aux_accuracy" not in kd and set(kd["gradient_variance"]["distill"]) == {"kd"}
    assert (voted_run / "models" / "fedmitr.aux.safetensors").is_file()
    assert not (voted_run / "models" / "sparse-kd.aux.safetensors").exists()


def test_a_shared_checkpoint_carries_its_aux_head_and_eval_and_the_card_give_both_accuracies(voted_run, tmp_path,
                                                                                            capsys):
    out = hub.export(voted_run, tmp_path / "export", method="fedmitr")
    assert (out / "fedmitr_aux_head.safetensors").is_file()
    model, info = hub.load(f"local-dir:{out}")  # timm still loads the model alone
    head, vote = info["aux_head"]
    assert vote == 0.5 and head.weight.shape == (10, model.embed_dim)
    result = hub.evaluate_checkpoint(model, "mnist5k", info["aux_head"])
    assert {"accuracy", "vote_accuracy", "vote"} <= set(result)
    assert sum(map(sum, result["confusion"])) == result["num_test"]
    metrics = json.loads((voted_run / "metrics.json").read_text())["methods"]["fedmitr"]
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    values = [m["value"] for r in card["model-index"][0]["results"] for m in r["metrics"]]
    assert values == [pytest.approx(metrics["cls_accuracy"], abs=1e-4), pytest.approx(metrics["accuracy"], abs=1e-4)]
    assert "Two accuracies" in (out / "README.md").read_text()
    assert main(["eval", "--model", f"local-dir:{out}"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"test accuracy \d+\.\d% on 1000 images with fedmitr's vote .* \d+\.\d% with the class token "
                     r"alone", text)


def test_the_relabel_panel_says_what_the_patch_tokens_learned(voted_run):
    from app.views import tokens_learned_text

    entry = json.loads((voted_run / "metrics.json").read_text())["methods"]["fedmitr"]
    line = tokens_learned_text(entry)
    assert line.startswith("**What the patch tokens learned:**")
    assert f"{entry['aux_accuracy']['max']:.1%}" in line and "chance 10%" in line and "votes" in line
    assert tokens_learned_text({"accuracy": 0.5}) == ""
