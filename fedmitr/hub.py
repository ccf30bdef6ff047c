"""Share what a run made: a timm checkpoint with a model card, the synthetic set as a dataset.

    export("runs/demo", "export/demo")             # the folder a push uploads, nothing sent
    push("runs/demo", "me/fedmitr-mnist")          # create the repo, one commit; returns its URL
    model, info = load("hf-hub:me/fedmitr-mnist")  # or "local-dir:export/demo", offline

The exported folder is timm's own Hub layout (``config.json`` with the ``model_args`` a scratch ViT
needs, ``model.safetensors``, written by :func:`timm.models.save_for_hf`), so
``timm.create_model("hf-hub:USER/NAME", pretrained=True)`` rebuilds the global model with the same
predictions. Next to it: the run's config and metrics (``fedmitr_config.json``,
``fedmitr_metrics.json``), the accuracy curve (``accuracy_curve.png``) and a model card
(``README.md``) whose ``model-index`` carries the measured test accuracy.

A token is never printed, logged, written to a file or put in an error message.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import ModelConfig
from fedmitr.errors import ConfigError, HubError, excerpt, redact
from fedmitr.methods import METHODS, headline
from fedmitr.online import hub_offline, hub_reachable
from fedmitr.models import vote_logits
from fedmitr.relabel import diagnostics_text
from fedmitr.rundir import EXPORTED, RunDir, load_aux_head

# timm's registered ViT whose builder a scratch ViT's ``model_args`` override entirely: the Hub
# config names it as the architecture, so timm.create_model can rebuild the model from the args.
SCRATCH_ARCH = "vit_tiny_patch16_224"
LICENSE = "apache-2.0"


# --- the model ---------------------------------------------------------------------------------------

def timm_architecture(cfg: ModelConfig, num_classes: int, in_chans: int, image_size: int) -> tuple[str, dict]:
    """(timm model name, ``model_args``) that rebuild the model of ``cfg`` with ``timm.create_model``."""
    if cfg.arch != "scratch":
        return cfg.arch, {"num_classes": num_classes, "in_chans": in_chans, "img_size": cfg.img_size or 224}
    img_size = cfg.img_size or image_size
    return SCRATCH_ARCH, {
        "img_size": img_size, "patch_size": img_size // cfg.patch_grid, "in_chans": in_chans,
        "num_classes": num_classes, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio, "global_pool": "token", "class_token": True,
    }


def export(run_dir: str | Path, out_dir: str | Path, *, method: str | None = None, include_clients: bool = False,
           include_synthetic: bool = False) -> Path:
    """Write exactly the folder :func:`push` uploads. Nothing is written if the run cannot be exported."""
    import timm
    from timm.models import save_for_hf

    run = RunDir.open(run_dir)
    method = method or headline().name
    checkpoint = run.model_path(method)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export folder {excerpt(str(out), 80)} is not empty; give a new folder")
    ds = run.metrics["dataset"]
    arch, model_args = timm_architecture(run.config.model, ds["num_classes"], ds["channels"], ds["image_size"])
    model = timm.create_model(arch, pretrained=False, **model_args)
    model.load_state_dict(load_file(str(checkpoint)))
    data_config = {"input_size": (ds["channels"], ds["image_size"], ds["image_size"])}
    if "mean" in ds:  # the normalisation the model expects
        data_config.update(mean=tuple(ds["mean"]), std=tuple(ds["std"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))  # complete, then renamed into place
    try:
        save_for_hf(model, str(tmp), model_config={"pretrained_cfg": {"tag": f"fedmitr-{method}", "license": LICENSE}},
                    model_args=model_args, safe_serialization=True, data_config=data_config)
        (tmp / "fedmitr_config.json").write_text(json.dumps(run.metrics["config"], indent=2) + "\n")
        (tmp / "fedmitr_metrics.json").write_text(json.dumps(run.metrics, indent=2) + "\n")
        curve = run.metrics["methods"][method].get("curve")
        if curve:
            curve_png(curve, run.metrics["methods"], method).save(tmp / "accuracy_curve.png")
        if include_clients:
            (tmp / "clients").mkdir()
            for c in run.metrics["clients"]:
                shutil.copy2(run.client_path(c["index"]), tmp / "clients" / run.client_path(c["index"]).name)
        if include_synthetic:
            synthetic_dataset(run, method).save_to_disk(str(tmp / "synthetic"))
        if run.aux_file(method).is_file():  # the aux head, for Token Labeling's vote (timm ignores it)
            shutil.copy2(run.aux_file(method), tmp / EXPORTED["aux_head"])
        if run.events_file.is_file():  # the whole run, replayable in the app's Try tab
            shutil.copy2(run.events_file, tmp / "fedmitr_events.jsonl")
        model_card(run, method, arch).save(tmp / "README.md")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load(model_ref: str) -> tuple[VisionTransformer, dict[str, Any]]:
    """A shared checkpoint, ``hf-hub:ID`` or ``local-dir:PATH``, and the fedmitr run it came from
    (its ``fedmitr_config.json`` / ``fedmitr_metrics.json``; empty if it has none)."""
    import timm

    if not isinstance(model_ref, str) or not model_ref.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"a model is hf-hub:USER/NAME or local-dir:PATH (got {excerpt(model_ref)})")
    where = model_ref.split(":", 1)[1]
    if model_ref.startswith("hf-hub:"):
        check_repo_id(where)
        require_hub()
    elif not (Path(where) / "config.json").is_file():
        raise ConfigError(f"{excerpt(where, 80)} holds no exported model (no config.json); make one with "
                          f"`fedmitr export`")
    try:
        model = timm.create_model(model_ref, pretrained=True)
        info = _run_info(model_ref)
    except (ConfigError, HubError):
        raise
    except Exception as err:  # noqa: BLE001 - network, missing repo, offline: all "cannot have it"
        raise HubError(f"cannot load {excerpt(model_ref, 80)}: {type(err).__name__}: "
                       f"{redact(str(err).splitlines()[0] if str(err) else '')[:200]}. Offline? "
                       f"local-dir:PATH works without the network") from None
    return model.eval(), info


def _run_info(model_ref: str) -> dict[str, Any]:
    """The run record a shared checkpoint carries (empty for a timm checkpoint from elsewhere), with
    ``has_events``: whether its whole run can be replayed, and ``aux_head``: ``(nn.Linear, vote)``
    when it carries its aux head for Token Labeling's vote (else None)."""
    folder = _shared_folder(model_ref, ("fedmitr_metrics.json",))
    path = folder / EXPORTED["metrics"] if folder is not None else None
    if path is None or not path.is_file():
        return {}
    aux = _shared_folder(model_ref, (EXPORTED["aux_head"],))
    return {**json.loads(path.read_text()), "has_events": _shared_folder(model_ref, (EXPORTED["events"],)) is not None,
            "aux_head": load_aux_head(aux / EXPORTED["aux_head"]) if aux is not None else None}


def _shared_folder(model_ref: str, files: tuple[str, ...]) -> Path | None:
    """The local folder holding ``files`` of a shared checkpoint (downloaded from the Hub into its
    cache for ``hf-hub:``), or None when it does not have them."""
    where = model_ref.split(":", 1)[1]
    if model_ref.startswith("local-dir:"):
        return Path(where) if all((Path(where) / f).is_file() for f in files) else None
    from huggingface_hub import hf_hub_download

    try:
        return Path([hf_hub_download(where, f) for f in files][-1]).parent
    except Exception:  # noqa: BLE001 - a checkpoint from elsewhere has no run record
        return None


def load_run(model_ref: str) -> RunDir:
    """The whole run a shared checkpoint (``hf-hub:ID`` or ``local-dir:PATH``) carries: its
    metrics and event stream, for a replay."""
    if not isinstance(model_ref, str) or not model_ref.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"a model is hf-hub:USER/NAME or local-dir:PATH (got {excerpt(model_ref)})")
    if model_ref.startswith("hf-hub:"):
        check_repo_id(model_ref.split(":", 1)[1])
        require_hub()
    folder = _shared_folder(model_ref, (EXPORTED["metrics"], EXPORTED["events"]))
    if folder is None:
        raise ConfigError(f"{excerpt(model_ref, 80)} carries no recorded run (fedmitr_metrics.json and "
                          f"fedmitr_events.jsonl); a checkpoint exported by fedmitr carries both")
    return RunDir.exported(folder)


# --- is the Hub there? (hub_offline and hub_reachable: fedmitr.online, torch-free) ---------------------

def require_hub() -> None:
    """Fail at once, in one line, when the Hub cannot be reached."""
    if hub_offline():
        raise HubError("the Hugging Face Hub is off for this machine (HF_HUB_OFFLINE is set); local-dir:PATH "
                       "works without it")
    if not hub_reachable():
        raise HubError("the Hugging Face Hub does not answer from this machine (no network?); local-dir:PATH "
                       "works without it")


# --- pushing -----------------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid USER/NAME (huggingface_hub's own rules); else a ConfigError that
    does not repeat it in full (a token pasted into the wrong box must not be echoed)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ConfigError(f"a Hub repo id is USER/NAME (got {excerpt(repo_id)})")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"a Hub repo id is USER/NAME with letters, digits, '-', '_' and '.', not starting or "
                          f"ending with '-' or '.', at most 96 characters (got {excerpt(repo_id)})") from None
    return repo_id


def require_token(token: str | None) -> str:
    """The token to push with: the one given, else the one huggingface_hub finds ($HF_TOKEN, or what
    `hf auth login` saved); a clear error before any network call when there is none."""
    from huggingface_hub import get_token

    found = token or get_token()
    if not found:
        raise HubError("pushing needs a Hugging Face token with write access: log in (`hf auth login`), set "
                       "HF_TOKEN, or pass one")
    return found


def push(run_dir: str | Path, repo_id: str, *, token: str | None = None, private: bool = False,
         method: str | None = None, include_clients: bool = False, include_synthetic: bool = False) -> str:
    """Export ``method``'s model and push it as one commit to ``repo_id`` (created if needed).

    Returns the commit's URL. Everything is checked, and the folder exported, before the Hub is
    contacted; a failure leaves nothing half-pushed (the upload is a single commit).
    """
    check_repo_id(repo_id)
    token = require_token(token)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="fedmitr-push-") as tmp:
        method = method or headline().name
        folder = export(run_dir, Path(tmp) / "export", method=method, include_clients=include_clients,
                        include_synthetic=include_synthetic)
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                       commit_message=f"FedMITR: {method} global model")
        except Exception as err:  # noqa: BLE001 - offline, auth, network: one clear line, no token
            raise HubError(f"push to {excerpt(repo_id)} failed: {type(err).__name__}: "
                           f"{redact(str(err).splitlines()[0] if str(err) else '')[:200]}") from None
    return commit.commit_url


# --- the synthetic set as a dataset ------------------------------------------------------------------

def synthetic_dataset(run: RunDir | str | Path, method: str | None = None):
    """The synthetic set of ``method`` as a :class:`datasets.Dataset`: an ``image`` column, the
    generated ``label`` (a ``ClassLabel``), and per patch the information density, the
    high-information mask, the stop iteration, the token label and whether it was relabelled; with
    the privacy check's nearest real image index and distances where the run recorded them."""
    from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value

    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a library call: no bars in the caller's output
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    synthetic, extra = run.synthetic(method or headline().name)
    names = extra.get("class_names") or [str(c) for c in range(int(synthetic.labels.max()) + 1)]
    images = synthetic.images.transpose(0, 2, 3, 1)
    if images.shape[-1] == 1:
        images = images[..., 0]
    columns = {
        "image": list(images), "label": synthetic.labels.astype(int).tolist(),
        "round": synthetic.round.astype(int).tolist(),
        "density": synthetic.density.astype(np.float32).tolist(), "high_information": synthetic.high_mask.tolist(),
        "stop_iteration": synthetic.stop_step.astype(int).tolist(), "token_label": synthetic.token_labels.astype(int).tolist(),
        "token_relabelled": synthetic.token_relabelled.tolist(),
    }
    features = {
        "image": Image(), "label": ClassLabel(names=list(names)), "round": Value("int16"),
        "density": Sequence(Value("float32")), "high_information": Sequence(Value("bool")),
        "stop_iteration": Sequence(Value("int16")), "token_label": Sequence(Value("int16")),
        "token_relabelled": Sequence(Value("bool")),
    }
    if extra.get("nearest_real_index") is not None:
        columns["nearest_real_index"] = extra["nearest_real_index"]
        features["nearest_real_index"] = Value("int64")
        for space, values in extra["nearest_real_distance"].items():
            columns[f"nearest_real_{space}_distance"] = values
            features[f"nearest_real_{space}_distance"] = Value("float32")
    return Dataset.from_dict(columns, features=Features(features))


def export_synthetic(run_dir: str | Path, out_dir: str | Path, *, method: str | None = None,
                     repo_id: str | None = None, token: str | None = None, private: bool = False) -> str:
    """Save the synthetic set with ``save_to_disk`` (and a dataset card); with ``repo_id``, also push
    it to the Hub as a dataset. Returns the folder, or the dataset's URL when pushed."""
    run = RunDir.open(run_dir)
    method = method or headline().name
    if repo_id is not None:
        check_repo_id(repo_id)
        token = require_token(token)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"export folder {excerpt(str(out), 80)} is not empty; give a new folder")
    ds = synthetic_dataset(run, method)
    ds.save_to_disk(str(out))
    dataset_card(run, method, len(ds)).save(out / "README.md")
    if repo_id is None:
        return str(out)
    try:
        ds.push_to_hub(repo_id, token=token, private=private)
        dataset_card(run, method, len(ds)).push_to_hub(repo_id, token=token, repo_type="dataset")
    except Exception as err:  # noqa: BLE001
        raise HubError(f"push of the synthetic set to {excerpt(repo_id)} failed: {type(err).__name__}: "
                       f"{redact(str(err).splitlines()[0] if str(err) else '')[:200]}") from None
    return f"https://huggingface.co/datasets/{repo_id}"


# --- cards and the curve -----------------------------------------------------------------------------

def _privacy_text(metrics: dict[str, Any], method: str) -> str:
    check = metrics.get("privacy", {}).get(method)
    if not check:
        return "No privacy check was recorded for this run."
    px, ft = check["pixel"], check["feature"]
    return (f"Every synthetic image was compared with its nearest real training image (across all clients; the "
            f"check runs where the data is). In pixel space (RMS difference of pixels in [0, 1]) the median "
            f"distance was {px['median']:.3f}, the smallest {px['min']:.3f}; real training images of the same "
            f"class are {px['reference_median']:.3f} apart from their nearest neighbour (median), and "
            f"{px['closer_than_reference_p5']:.1%} of the synthetic images are nearer to a real image than 95% "
            f"of real images are to theirs. In the ensemble's feature space: median {ft['median']:.3f} against "
            f"{ft['reference_median']:.3f} for real pairs, {ft['closer_than_reference_p5']:.1%} nearer than "
            f"the 5th percentile.")


TEMPLATES = Path(__file__).resolve().parent / "templates"


def card_title(method: str, dataset: str) -> str:
    """The model card's title, from the method's display label: "FedMITR global model (mnist5k)",
    "Global model of dense inversion + KD (mnist5k)"."""
    label = METHODS[method].label if method in METHODS else method
    if " " in label or "," in label:
        return f"Global model of {label} ({dataset})"
    return f"{label} global model ({dataset})"


def model_card(run: RunDir, method: str, arch: str):
    """The model card: ``templates/model_card.md`` filled in by ``ModelCard.from_template``, with a
    ``model-index`` carrying the measured test accuracy."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    m, cfg = run.metrics, run.config
    entry = m["methods"][method]
    ds = m["dataset"]
    # timm's prediction is the class token alone; with a vote, fedmitr's is the vote (both are reported).
    voted = bool(entry.get("vote")) and "cls_accuracy" in entry
    acc = entry["cls_accuracy"] if voted else entry["accuracy"]
    results = [EvalResult(task_type="image-classification", dataset_type=ds["name"], dataset_name=ds["name"],
                          dataset_split="test", metric_type="accuracy", metric_value=round(acc, 4),
                          metric_name="Test accuracy (class token, as timm predicts)" if voted else "Test accuracy")]
    if voted:
        results.append(EvalResult(task_type="image-classification", dataset_type=ds["name"], dataset_name=ds["name"],
                                  dataset_split="test", metric_type="accuracy", metric_value=round(entry["accuracy"], 4),
                                  metric_name=f"Test accuracy (fedmitr's vote, lambda {entry['vote']:g})"))
    card_data = ModelCardData(
        library_name="timm", license=LICENSE, pipeline_tag="image-classification",
        tags=["federated-learning", "one-shot-federated-learning", "fedmitr", "vision-transformer",
              "model-inversion", "knowledge-distillation", "image-classification"],
        model_name=card_title(method, ds["name"]),
        eval_results=results,
    )
    spec = METHODS.get(method)
    # What the method did in this run, from its config and relabel diagnostics (never a claim the run
    # did not make); methods without synthesis have their registry description.
    if spec is not None and hasattr(spec, "describe"):
        description = spec.describe(cfg, m["methods"][method].get("relabel"))
    else:
        description = (spec.description or f"Method: {spec.summary}.") if spec is not None else f"Method `{method}`."
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATES / "model_card.md"),
        title=card_title(method, ds["name"]), method=method, ds=ds, cfg=cfg, arch=arch, description=description,
        alpha="IID" if cfg.data.alpha is None else f"Dirichlet α={cfg.data.alpha:g}",
        patches=m["methods"][method].get("patches", "?"), device=m.get("device", "?"),
        seconds=m["methods"][method]["seconds"], results=m["methods"],
        clients=", ".join(f"{c['accuracy']:.1%}" for c in m["clients"]),
        privacy=_privacy_text(m, method),
        relabel=diagnostics_text(m["methods"][method].get("relabel"), ds.get("class_names")),
        entry=entry, voted=voted,
    )


def dataset_card(run: RunDir, method: str, size: int):
    from huggingface_hub import DatasetCard, DatasetCardData

    ds = run.metrics["dataset"]
    data = DatasetCardData(license=LICENSE, task_categories=["image-classification"],
                           tags=["synthetic", "model-inversion", "federated-learning", "fedmitr"],
                           pretty_name=f"FedMITR synthetic images ({method}, {ds['name']})")
    text = f"""
# Synthetic images of a FedMITR run ({method}, {ds['name']})

{size} images the server synthesised from the client models alone (model inversion; it never saw real data),
each with the class it was made for (`label`) and, per patch (row-major on the patch grid): the information
density (share of the ensemble's attention), the high-information mask, the iteration at which sparse
inversion stopped optimising it (-1: never), the class its token was trained on and whether that class came
from the ensemble's relabel.

## Privacy check

{_privacy_text(run.metrics, method)} `nearest_real_index` points into the training split of the run that made
them (not shared here).
"""
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n{text}")


def curve_png(curve: list[float], methods: dict[str, Any], method: str, size: tuple[int, int] = (480, 300)):
    """A small PNG of the accuracy per round, with the methods without rounds (FedAvg, the ensemble)
    as reference lines, each in its method's colour."""
    from PIL import Image, ImageColor, ImageDraw

    w, h = size
    left, right, top, bottom = 48, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)

    def xy(i: float, acc: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, len(curve) - 1))
        return x, top + (h - top - bottom) * (1 - acc)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = xy(0, tick)[1]
        draw.line([(left, y), (w - right, y)], fill=(229, 231, 235))
        draw.text((6, y - 6), f"{tick:.0%}", fill=(75, 85, 99))
    for name, entry in methods.items():
        if name in METHODS and not METHODS[name].synthesises:
            colour = ImageColor.getrgb(METHODS[name].colour)
            y = xy(0, entry["accuracy"])[1]
            draw.line([(left, y), (w - right, y)], fill=colour, width=1)
            draw.text((w - right - 70, y - 12), name, fill=colour)
    own = ImageColor.getrgb(METHODS[method].colour) if method in METHODS else (209, 73, 91)
    draw.line([xy(i, a) for i, a in enumerate(curve)] if len(curve) > 1 else [xy(0, curve[0])] * 2, fill=own, width=3)
    for i, a in enumerate(curve):
        x, y = xy(i, a)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=own)
    draw.text((left, 6), f"{method}: test accuracy per round (final {curve[-1]:.1%})", fill=(31, 41, 55))
    draw.text((w // 2 - 20, h - 18), "round", fill=(75, 85, 99))
    return img


# --- evaluation of a shared checkpoint ---------------------------------------------------------------

@torch.no_grad()
def evaluate_checkpoint(model: VisionTransformer, dataset_name: str,
                        aux_head: tuple[torch.nn.Linear, float] | None = None) -> dict[str, Any]:
    """Test accuracy and the confusion matrix of a loaded checkpoint on a registry dataset.

    ``accuracy`` is timm's: the class token alone. With ``aux_head`` ``(head, vote)`` (what
    :func:`load` finds beside a fedmitr checkpoint) and a vote > 0, ``vote_accuracy`` is fedmitr's
    prediction, Token Labeling's vote ``head(cls) + vote * max_i aux(z_i)``, and the confusion
    matrix is the vote's."""
    from fedmitr.data import open_dataset
    from fedmitr.ensemble import Ensemble

    ds = open_dataset(dataset_name)
    expected = (ds.num_classes, ds.channels)
    got = (model.num_classes, model.patch_embed.proj.in_channels)
    if expected != got:
        raise ConfigError(f"this model takes {got[1]}-channel images and predicts {got[0]} classes; "
                          f"{excerpt(dataset_name)} has {expected[1]} channel(s) and {expected[0]} classes")
    logits = Ensemble([model]).predict_logits(ds.test.images)
    out: dict[str, Any] = {"accuracy": float((logits.argmax(1) == ds.test.labels).float().mean())}
    if aux_head is not None and aux_head[1] > 0:
        head, vote = aux_head
        logits = vote_logits(model, head, ds.test.images, vote)
        out.update(vote=vote, vote_accuracy=float((logits.argmax(1) == ds.test.labels).float().mean()))
    pred = logits.argmax(1)
    confusion = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.long)
    confusion.index_put_((ds.test.labels, pred), torch.ones_like(pred), accumulate=True)
    return {"dataset": ds.name, **out, "confusion": confusion.tolist(), "class_names": list(ds.class_names),
            "num_test": len(ds.test)}
