"""Sharing from the app: push a run's global model to the Hub, and try a shared checkpoint.

The token for a push comes from the Space's "Sign in with Hugging Face" button when the app runs
on a Space (``SPACE_ID`` is set; the login button calls the Hub, so it is only created there), else
from a password box, else from ``HF_TOKEN``. It is used for the push and dropped: never logged,
written, put in a message or sent back to the browser (the box is cleared after each push).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from fedmitr.catalog import BUNDLED
from fedmitr.errors import USER_ERRORS, redact

from app import form, views
from app.runview import RunView

RUN_DIR = "run-dir:"  # a replay reference to a run directory on this machine (app.replay.replay_ref)
OWN, HUB = "a global model of the run on the Run tab", "a model on the Hugging Face Hub"
FILE = "a downloaded model (its .safetensors and the run's metrics.json, from Downloads)"


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def _refuse(message: str, title: str = "Cannot share") -> gr.Error:
    return gr.Error(redact(message), title=title, print_exception=False)


# Why "Sign in" asks what it asks (the Space's README front matter, hf_oauth_scopes).
SIGN_IN_SCOPES = ("Signing in asks Hugging Face for one permission, *contribute-repos*: to create a model repo in "
                  "your name and write to the repos this Space created. It cannot read or change your other "
                  "repos; to push to one of those, paste a token with write access instead.")
# What a panel says after a refusal, once the error message in the corner has faded.
FAILED_TRY = "**Nothing loaded.** The message that appeared said why; change the choice and press Load again."
FAILED_PUSH = "**Nothing pushed.** The message that appeared said why; fix it and push again."
PUSH_INSTEAD = "Download the model from the results instead, or use `fedmitr push` where you are online."
TRY_INSTEAD = ("Try the run on the Run tab instead, or a downloaded model (its .safetensors and the run's "
               "metrics.json, from a run's Downloads).")


def _hub_ready(instead: str = PUSH_INSTEAD, title: str = "Cannot share") -> None:
    """Fail at once, with what to do instead, when the Hub cannot be reached."""
    if form.hub_offline():
        raise _refuse("The Hugging Face Hub is out of reach: this app runs offline (HF_HUB_OFFLINE is set). "
                      + instead, title=title)
    if not form.hub_reachable():
        raise _refuse("The Hugging Face Hub does not answer from this machine right now; try again later. " + instead,
                      title=title)


def _finished_run(view: RunView | None) -> RunView:
    if view is None or view.state != "done" or not view.out_dir:
        raise _refuse("Run the pipeline first: sharing works on a finished run of this tab.")
    return view


# --- push ---------------------------------------------------------------------------------------------

def push(view: RunView | None, method: str | None, *, repo: str, private: bool, token_text: str,
         oauth_token: Any = None) -> tuple[str, Any]:
    """Push ``method``'s global model of this tab's run. Returns (the link, a cleared token box)."""
    from fedmitr import hub

    run = _finished_run(view)
    repo = (repo or "").strip()
    if not method:
        raise _refuse("Choose which global model to push.")
    if not repo:
        raise _refuse("Give a repo id, USER/NAME (it is created if it does not exist).")
    token = getattr(oauth_token, "token", None) or (token_text or "").strip() or None
    try:
        hub.check_repo_id(repo)
        hub.require_token(token)  # no token at all: say so before probing the network
        _hub_ready()
        url = hub.push(run.out_dir, repo, token=token, private=bool(private), method=method)
    except USER_ERRORS as err:
        raise _refuse(str(err)) from None
    return (f"Pushed **{method}** to [{repo}]({url.rsplit('/commit/', 1)[0]}) ([the commit]({url})). "
            f"Load it with `timm.create_model(\"hf-hub:{repo}\", pretrained=True)`.", "")


def build_share_panel(view_state: gr.State) -> gr.Dropdown:
    """The Share accordion (under the results); returns its method dropdown, which a run fills."""
    with gr.Accordion("Share the global model on the Hugging Face Hub", open=False, elem_id="share"):
        method = gr.Dropdown(label="Global model", choices=[], value=None, elem_id="share-method")
        repo = gr.Textbox(label="Model repo", placeholder="your-name/fedmitr-mnist", elem_id="share-repo")
        private = gr.Checkbox(label="Private repo", value=False, elem_id="share-private")
        if on_space():
            gr.Markdown(SIGN_IN_SCOPES, elem_classes="fm-explain")
            gr.LoginButton()
        token = gr.Textbox(label="Token with write access" + (" (or sign in above)" if on_space() else ""),
                           type="password", placeholder="hf_... (else HF_TOKEN is used)", elem_id="share-token")
        button = gr.Button("Push to the Hub", elem_id="share-push")
        result = gr.Markdown(elem_id="share-result")
        gr.Markdown("The push uploads the model in timm's layout, a model card with the measured accuracy and the "
                    "privacy check, the run's config and metrics, and the accuracy curve: one commit.",
                    elem_classes="fm-explain")
    def push_from_form(values: dict) -> tuple[str, Any]:
        """Gradio hands the panel's inputs over as one dict, component -> value."""
        return push(values[view_state], values[method], repo=values[repo], private=values[private],
                    token_text=values[token])

    def push_with_login(values: dict, oauth_token: gr.OAuthToken | None) -> tuple[str, Any]:
        """On a Space: the signed-in user's token, from the login button."""
        return push(values[view_state], values[method], repo=values[repo], private=values[private],
                    token_text=values[token], oauth_token=oauth_token)

    handler = push_with_login if on_space() else push_from_form
    # The result of an earlier push goes before this one starts, and the token box is emptied after
    # every push: a push that worked returns an empty box, and a refused one empties it by .failure.
    pushed = button.click(lambda: "", None, [result], queue=False, api_visibility="private", show_progress="hidden") \
        .then(handler, {view_state, method, repo, private, token}, [result, token], api_name="push", concurrency_limit=2,
              show_progress="minimal", api_description="Push a global model of this session's finished run to the Hub.")
    pushed.failure(lambda: ("", FAILED_PUSH), None, [token, result], queue=False, api_visibility="private",
                   show_progress="hidden")
    return method


# --- try a checkpoint --------------------------------------------------------------------------------

def downloaded_run(files: list[str] | None, folder: Path) -> tuple[Path, str]:
    """A run folder in ``folder`` made of what a visitor downloaded from the results: one global
    model's ``<method>.safetensors`` and the run's ``metrics.json`` (which holds its config). Returns
    (the run folder, the method). A clear error names what is missing."""
    paths = [Path(f) for f in (files or [])]
    models = [p for p in paths if p.name.endswith(".safetensors") and not p.name.endswith(".aux.safetensors")]
    metrics = [p for p in paths if p.name == "metrics.json"]
    if len(models) != 1 or len(metrics) != 1:
        raise _refuse("Upload two files from a run's Downloads: one global model (for example fedmitr.safetensors) "
                      "and that run's metrics.json, which says how the model was built.", title="Cannot load")
    method = models[0].name.removesuffix(".safetensors")
    (folder / "models").mkdir(parents=True)
    shutil.copyfile(metrics[0], folder / "metrics.json")
    shutil.copyfile(models[0], folder / "models" / models[0].name)
    return folder, method


def try_checkpoint(view: RunView | None, source: str, *, own_method: str | None, hub_id: str, dataset: str,
                   count: int = 8, files: list[str] | None = None) -> tuple[str, list, Any, str]:
    """Load a checkpoint, test it on a bundled dataset, and show test images with its prediction and
    its class token's attention on each patch. Also returns the Replay button's update and the
    model reference it replays: a shared checkpoint that carries its run's events, or the recorded
    run on the Run tab (the example)."""
    from fedmitr import hub
    from fedmitr.data import open_dataset
    from fedmitr.models import patch_grid, sparse_forward, vote_logits

    if dataset not in BUNDLED:
        raise _refuse(f"Choose a bundled dataset: {', '.join(BUNDLED)}.", title="Cannot evaluate")
    try:
        if source == HUB:
            if not (hub_id or "").strip():
                raise _refuse("Give a model id on the Hub, USER/NAME.", title="Cannot load")
            hub.check_repo_id(hub_id.strip())
            _hub_ready(TRY_INSTEAD, title="Cannot load")
            ref = f"hf-hub:{hub_id.strip()}"
            model, info = hub.load(ref)
            where, replayable = hub_id.strip(), info.get("has_events", False)
        elif source == FILE:
            with tempfile.TemporaryDirectory(prefix="fedmitr-try-") as tmp:
                folder, method = downloaded_run(files, Path(tmp) / "run")
                exported = hub.export(folder, Path(tmp) / "model", method=method)
                model, info = hub.load(f"local-dir:{exported}")  # the same path a shared checkpoint takes
            where, ref, replayable = f"The downloaded {views.method_label(method)} model", "", False
        else:
            run = _finished_run(view)
            if own_method not in run.models:
                raise _refuse(f"Choose one of this run's global models: {', '.join(run.models)}.",
                              title="Cannot load")
            with tempfile.TemporaryDirectory(prefix="fedmitr-try-") as tmp:
                folder = hub.export(run.out_dir, Path(tmp) / "model", method=own_method)
                model, info = hub.load(f"local-dir:{folder}")  # the same path a shared checkpoint takes
            where = f"{run.name}'s {views.method_label(own_method)} model"
            where = where[0].upper() + where[1:]
            # A recorded run (the example) replays from its own events; a live run is on the Run tab.
            ref, replayable = f"{RUN_DIR}{run.out_dir}", bool(run.recorded)
        result = hub.evaluate_checkpoint(model, dataset, info.get("aux_head"))
    except USER_ERRORS as err:
        raise _refuse(str(err), title="Cannot load") from None
    ds = open_dataset(dataset)
    pick = torch.linspace(0, len(ds.test) - 1, count).long()
    with torch.no_grad():
        out = sparse_forward(model, ds.test.images[pick])
    predicted = out.logits
    if "vote_accuracy" in result:  # what fedmitr predicts: the vote
        predicted = vote_logits(model, info["aux_head"][0], ds.test.images[pick], result["vote"])
    names, grid = ds.class_names, patch_grid(model)
    images = ds.to_unit(ds.test.images[pick]).numpy()
    items = []
    for k in range(count):
        pred, true = int(predicted[k].argmax()), int(ds.test.labels[pick[k]])
        caption = f"pred {names[pred]} · true {names[true]}"
        items.append((views.attention_overlay(images[k], out.cls_attention[k].numpy(), grid, caption), None))
    trained_on = info.get("dataset", {}).get("name")
    note = f" (trained on {trained_on})" if trained_on and trained_on != dataset else ""
    if "vote_accuracy" in result:
        accuracy = (f"test accuracy **{result['vote_accuracy']:.1%}** over {result['num_test']} images with fedmitr's "
                    f"vote (the class token plus {result['vote']:g} × the aux head's largest vote over the patch "
                    f"tokens; {result['accuracy']:.1%} with the class token alone, as timm predicts)")
    else:
        accuracy = f"test accuracy **{result['accuracy']:.1%}** over {result['num_test']} images"
    return (f"**{where}** on {result['dataset']}{note}: {accuracy}. The tint is the class token's attention on each patch (bright: most "
            f"attended)." + (" It carries its whole run: **Replay it** to see every stage on the Run tab."
                             if replayable else ""),
            items, gr.update(visible=replayable), ref if replayable else "")


@dataclass(kw_only=True)
class TryTab:
    own: Any  # the dropdown of this session's global models (a run fills it)
    replay: Any  # "Replay this run" (shown for a shared checkpoint that carries its events)
    replay_ref: Any  # gr.State: the model reference to replay


def build_try_tab(view_state: gr.State) -> TryTab:
    """The "Try a checkpoint" tab."""
    with gr.Tab("Try a checkpoint", id="try"):
        gr.Markdown("Load a global model, from the run on the Run tab (the recorded example, or your own), "
                    "from the Hub, or from a run's Downloads (the model and metrics.json), test it on a bundled "
                    "dataset and see what it looks at.",
                    elem_classes="fm-explain")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                source = gr.Radio(label="Model", choices=[OWN, HUB, FILE], value=OWN, elem_id="try-source")
                own = gr.Dropdown(label="Global model of the run on the Run tab", choices=[], value=None,
                                  elem_id="try-own")
                hub_id = gr.Textbox(label="Model on the Hub", placeholder="USER/NAME", elem_id="try-hub", visible=False)
                dataset = gr.Dropdown(label="Test on", choices=list(BUNDLED), value="mnist5k", elem_id="try-dataset")
                # Created after the dataset: the /try API's inputs keep their order, the new one last.
                upload = gr.File(label="The model's .safetensors and the run's metrics.json", file_count="multiple",
                                 file_types=[".safetensors", ".json"], elem_id="try-files", visible=False)
                button = gr.Button("Load and evaluate", variant="primary", elem_id="try-btn")
            with gr.Column(scale=3):
                summary = gr.Markdown(elem_id="try-summary")
                replay = gr.Button("Replay this run on the Run tab", visible=False, elem_id="try-replay")
                samples = gr.Gallery(show_label=False, columns=8, height="auto", object_fit="contain",
                                     allow_preview=False, elem_id="try-gallery")
        replay_ref = gr.State("")
        # One box at a time: the session's models, or a Hub id.
        source.change(lambda s: (gr.update(visible=s == OWN), gr.update(visible=s == HUB), gr.update(visible=s == FILE)),
                      [source], [own, hub_id, upload], queue=False, api_visibility="private", show_progress="hidden")
        def try_from_form(values: dict) -> tuple[str, list, Any, str]:
            """Gradio hands the form over as one dict, component -> value."""
            return try_checkpoint(values[view_state], values[source], own_method=values[own],
                                  hub_id=values[hub_id], dataset=values[dataset], files=values[upload])

        # The last result goes before the next load starts, so no old sentence sits under a new error.
        button.click(lambda: ("", [], gr.update(visible=False), ""), None, [summary, samples, replay, replay_ref],
                     queue=False, api_visibility="private", show_progress="hidden") \
            .then(try_from_form, {view_state, source, own, hub_id, dataset, upload},
                  [summary, samples, replay, replay_ref],
                  api_name="try", concurrency_limit=2, show_progress="minimal",
                  api_description="Evaluate a checkpoint (the run on the Run tab, or a Hub model) on a bundled "
                                  "dataset.") \
            .failure(lambda: (FAILED_TRY, []), None, [summary, samples], queue=False, api_visibility="private",
                     show_progress="hidden")  # once the message fades, the panel still says what happened
    return TryTab(own=own, replay=replay, replay_ref=replay_ref)
