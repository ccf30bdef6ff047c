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
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from fedmitr.config import ModelConfig, RunConfig, apply_overrides, preset_config
from fedmitr.errors import ConfigError, HubError, excerpt, redact
from fedmitr.methods import METHODS
from fedmitr.synthetic import SyntheticSet

# timm's registered ViT whose builder a scratch ViT's ``model_args`` override entirely: the Hub
# config names it as the architecture, so timm.create_model can rebuild the model from the args.
SCRATCH_ARCH = "vit_tiny_patch16_224"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LICENSE = "apache-2.0"


@dataclass
class RunDir:
    """A finished run directory, as written by :func:`fedmitr.pipeline.run`."""

    path: Path
    config: RunConfig
    metrics: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        path = Path(path)
        if not (path / "metrics.json").is_file():
            raise ConfigError(f"{excerpt(str(path), 80)} is not a finished run directory (no metrics.json); "
                              f"give the --out folder of a `fedmitr run`")
        try:
            metrics = json.loads((path / "metrics.json").read_text())
            config = apply_overrides(preset_config(metrics["config"]["preset"]), metrics["config"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"the run directory's metrics.json cannot be read ({type(err).__name__}); "
                              f"was it written by fedmitr?") from None
        return cls(path, config, metrics)

    def model_path(self, method: str) -> Path:
        """The checkpoint of ``method``'s single global model; a clear error if the run has none."""
        ran = list(self.metrics.get("methods", {}))
        with_model = [m for m in ran if (self.path / "models" / f"{m}.safetensors").is_file()]
        if method not in with_model:
            why = "ran but makes no single model" if method in ran else "did not run"
            raise ConfigError(f"method {excerpt(method)} {why} in this run; global models here: "
                              f"{', '.join(with_model) or 'none'}")
        return self.path / "models" / f"{method}.safetensors"

    def synthetic(self, method: str) -> tuple[SyntheticSet, dict[str, Any]]:
        path = self.path / "synthetic" / f"{method}.safetensors"
        if not path.is_file():
            have = sorted(p.stem for p in (self.path / "synthetic").glob("*.safetensors"))
            raise ConfigError(f"this run kept no synthetic set for {excerpt(method)}; it has: {', '.join(have) or 'none'} "
                              f"(only inversion methods make one)")
        return SyntheticSet.load(path)


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


def export(run_dir: str | Path, out_dir: str | Path, method: str = "fedmitr", include_clients: bool = False,
           include_synthetic: bool = False) -> Path:
    """Write exactly the folder :func:`push` uploads. Nothing is written if the run cannot be exported."""
    import timm
    from timm.models import save_for_hf

    run = RunDir.open(run_dir)
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
            shutil.copytree(run.path / "clients", tmp / "clients")
        if include_synthetic:
            synthetic_dataset(run, method).save_to_disk(str(tmp / "synthetic"))
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
    where = model_ref.split(":", 1)[1]
    if model_ref.startswith("local-dir:"):
        path = Path(where) / "fedmitr_metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(where, "fedmitr_metrics.json")).read_text())
    except Exception:  # noqa: BLE001 - a timm checkpoint from elsewhere has no run record
        return {}


# --- pushing -----------------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ConfigError(f"a Hub repo id is USER/NAME with letters, digits, '-', '_' and '.' "
                          f"(got {excerpt(repo_id)})")
    return repo_id


def resolve_token(token: str | None) -> str:
    """The token to push with: the one given, else $HF_TOKEN, else the one `hf auth login` saved."""
    if token:
        return token
    from huggingface_hub import get_token

    found = os.environ.get("HF_TOKEN") or get_token()
    if not found:
        raise HubError("pushing needs a Hugging Face token with write access: log in (`hf auth login`), set "
                       "HF_TOKEN, or pass one")
    return found


def push(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
         method: str = "fedmitr", include_clients: bool = False, include_synthetic: bool = False) -> str:
    """Export ``method``'s model and push it as one commit to ``repo_id`` (created if needed).

    Returns the commit's URL. Everything is checked, and the folder exported, before the Hub is
    contacted; a failure leaves nothing half-pushed (the upload is a single commit).
    """
    check_repo_id(repo_id)
    token = resolve_token(token)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="fedmitr-push-") as tmp:
        folder = export(run_dir, Path(tmp) / "export", method, include_clients, include_synthetic)
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

def synthetic_dataset(run: RunDir | str | Path, method: str = "fedmitr"):
    """The synthetic set of ``method`` as a :class:`datasets.Dataset`: an ``image`` column, the
    generated ``label`` (a ``ClassLabel``), and per patch the information density, the
    high-information mask, the stop iteration, the token label and whether it was relabelled; with
    the privacy check's nearest real image index and distances where the run recorded them."""
    from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value

    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a library call: no bars in the caller's output
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    synthetic, extra = run.synthetic(method)
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


def export_synthetic(run_dir: str | Path, out_dir: str | Path, method: str = "fedmitr",
                     repo_id: str | None = None, token: str | None = None, private: bool = False) -> str:
    """Save the synthetic set with ``save_to_disk`` (and a dataset card); with ``repo_id``, also push
    it to the Hub as a dataset. Returns the folder, or the dataset's URL when pushed."""
    run = RunDir.open(run_dir)
    if repo_id is not None:
        check_repo_id(repo_id)
        token = resolve_token(token)
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


def model_card(run: RunDir, method: str, arch: str):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    m, cfg = run.metrics, run.config
    acc = m["methods"][method]["accuracy"]
    ds = m["dataset"]
    alpha = "IID" if cfg.data.alpha is None else f"Dirichlet α={cfg.data.alpha:g}"
    card_data = ModelCardData(
        library_name="timm", license=LICENSE, pipeline_tag="image-classification",
        tags=["federated-learning", "one-shot-federated-learning", "fedmitr", "vision-transformer",
              "model-inversion", "knowledge-distillation", "image-classification"],
        model_name=f"FedMITR {method} on {ds['name']}",
        eval_results=[EvalResult(task_type="image-classification", dataset_type=ds["name"], dataset_name=ds["name"],
                                 dataset_split="test", metric_type="accuracy", metric_value=round(acc, 4),
                                 metric_name="Test accuracy")],
    )
    refs = "".join(f"| {name} | {r['accuracy']:.1%} | {r['seconds']:.1f} |\n" for name, r in m["methods"].items())
    clients = ", ".join(f"{c['accuracy']:.1%}" for c in m["clients"])
    text = f"""
# FedMITR {method} global model ({ds['name']})

One global Vision Transformer built by **one-shot federated learning**: {cfg.data.num_clients} clients each
trained a ViT on their own non-IID share of the data and sent it to the server once; the server never saw
any data. {"It made this model with **FedMITR**: sparse model inversion of the client ensemble (synthetic images whose uninformative patches stop being optimised early), token relabel (high-information patches keep the generated label, the others are relabelled by the ensemble), and distillation into one ViT that uses every patch." if METHODS[method].relabel and METHODS[method].sparse else "Method: " + METHODS[method].summary + "."}
Made with the fedmitr library (method `{method}`).

## How it was trained

| | |
|---|---|
| dataset | {ds['name']} ({ds['num_train']} train / {ds['num_test']} test images, {ds['image_size']} px, {ds['num_classes']} classes; {ds['source']}) |
| clients | {cfg.data.num_clients}, label skew {alpha} |
| preset | `{cfg.preset}`, seed {cfg.seed} |
| architecture | timm `{arch}` rebuilt from `config.json`'s `model_args` ({m['methods'][method].get('patches', '?')} patches per image) |
| device | {m.get('device', '?')} |
| server-side seconds | {m['methods'][method]['seconds']:.1f} |

## Results on the test split (same run)

| model | accuracy | server seconds |
|---|---|---|
{refs}
Each client alone: {clients}. FedAvg averages the clients' weights; the ensemble averages their predictions
and needs all {cfg.data.num_clients} models at test time (it is the teacher).

## Use

```python
import timm, torch
model = timm.create_model("hf-hub:USER/NAME", pretrained=True).eval()
x = torch.randn(1, {ds['channels']}, {ds['image_size']}, {ds['image_size']})  # normalised like the training data
print(model(x).argmax(1))
```

Inputs are normalised with the training split's per-channel mean and std (`config.json`'s `mean`/`std`).

## Privacy check

{_privacy_text(m, method)}

## Limits

A small ViT trained from scratch on {ds['name']}: a teaching and research artefact, not a production
classifier. Its accuracy depends strongly on the skew, the seed and the clients' own accuracy (see
`fedmitr_metrics.json`); one seed says little. The privacy check is an empirical nearest-neighbour test,
not a formal guarantee.
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{text}")


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
    """A small PNG of the accuracy per round, with FedAvg and the ensemble as reference lines."""
    from PIL import Image, ImageDraw

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
    for name, colour in (("fedavg", (141, 141, 141)), ("ensemble", (43, 45, 66))):
        if name in methods:
            y = xy(0, methods[name]["accuracy"])[1]
            draw.line([(left, y), (w - right, y)], fill=colour, width=1)
            draw.text((w - right - 70, y - 12), name, fill=colour)
    draw.line([xy(i, a) for i, a in enumerate(curve)] if len(curve) > 1 else [xy(0, curve[0])] * 2,
              fill=(209, 73, 91), width=3)
    for i, a in enumerate(curve):
        x, y = xy(i, a)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(209, 73, 91))
    draw.text((left, 6), f"{method}: test accuracy per round (final {curve[-1]:.1%})", fill=(31, 41, 55))
    draw.text((w // 2 - 20, h - 18), "round", fill=(75, 85, 99))
    return img


# --- evaluation of a shared checkpoint ---------------------------------------------------------------

@torch.no_grad()
def evaluate_checkpoint(model: VisionTransformer, dataset_name: str) -> dict[str, Any]:
    """Test accuracy and the confusion matrix of a loaded checkpoint on a registry dataset."""
    from fedmitr.clients import predict_logits
    from fedmitr.data import open_dataset

    ds = open_dataset(dataset_name)
    expected = (ds.num_classes, ds.channels)
    got = (model.num_classes, model.patch_embed.proj.in_channels)
    if expected != got:
        raise ConfigError(f"this model takes {got[1]}-channel images and predicts {got[0]} classes; "
                          f"{excerpt(dataset_name)} has {expected[1]} channel(s) and {expected[0]} classes")
    logits = predict_logits([model], ds.test.images)
    pred = logits.argmax(1)
    confusion = torch.zeros(ds.num_classes, ds.num_classes, dtype=torch.long)
    confusion.index_put_((ds.test.labels, pred), torch.ones_like(pred), accumulate=True)
    return {"dataset": ds.name, "accuracy": float((pred == ds.test.labels).float().mean()),
            "confusion": confusion.tolist(), "class_names": list(ds.class_names), "num_test": len(ds.test)}
