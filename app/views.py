"""Pure drawing functions of the app: pipeline results in, plotly figures and PIL images out.

Nothing here knows about Gradio or runs training, so every view can be tested with hand-built
events (see tests/test_app_views.py). Colours, names and wording are shared by all views, so a
method looks the same in the bar chart, the curves and the table.
"""

from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from PIL import Image, ImageDraw
from plotly.colors import hex_to_rgb, sample_colorscale, unlabel_rgb
from plotly.subplots import make_subplots

from fedmitr.events import SyntheticRound
from fedmitr.methods import METHODS
from fedmitr.relabel import diagnostics_text

# --- shared look ----------------------------------------------------------------------------------

# One colour and one name per method everywhere, from the method registry. A method registered
# without a known colour gets a stable one of these.
_FALLBACK_COLOURS = ("#6a4c93", "#8ac926", "#1982c4", "#ff924c", "#52a675")
CLIENT_COLOUR = "#9dbbd6"
GENERATED_COLOUR = "#2a9d8f"  # patch trained on the generated label y
RELABEL_COLOUR = "#f4a261"  # patch trained on the ensemble's relabel
FONT = dict(family="Inter, system-ui, -apple-system, Segoe UI, sans-serif", size=13, color="#1f2937")


def method_colour(name: str) -> str:
    if name in METHODS:
        return METHODS[name].colour
    return _FALLBACK_COLOURS[sum(map(ord, name)) % len(_FALLBACK_COLOURS)]


def method_label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name


def _dash(name: str) -> str:
    """How a method is drawn as a horizontal reference line."""
    return METHODS[name].line if name in METHODS else "solid"


def _is_headline(name: str) -> bool:
    return name in METHODS and METHODS[name].role == "method"


def _base_layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", font=dict(size=15)),
        template="plotly_white", font=FONT, height=height,
        margin=dict(l=60, r=20, t=50, b=50), hoverlabel=dict(font_size=13),
        modebar=dict(orientation="v"),  # down the right edge, not over the title
    )
    return fig


def placeholder_figure(message: str, height: int = 320) -> go.Figure:
    """An empty figure that says what will appear here."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _base_layout(fig, "", height)


# --- the partition --------------------------------------------------------------------------------

def partition_heatmap(class_counts: np.ndarray, class_names: Sequence[str]) -> go.Figure:
    """Clients x classes heatmap of how many training images of each class each client holds.

    ``class_counts`` is ``[K, C]`` int (``PartitionReady.class_counts``).
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 2 or counts.shape[1] != len(class_names):
        raise ValueError(f"class_counts must be [clients, {len(class_names)}] (got shape {counts.shape})")
    k, c = counts.shape
    totals = counts.sum(axis=1)
    clients = [f"client {i + 1} ({totals[i]:,})" for i in range(k)]
    names = [str(n) for n in class_names]
    show_text = k * c <= 400
    fig = go.Figure(go.Heatmap(
        z=counts, x=names, y=clients, colorscale="Blues", zmin=0,
        text=counts if show_text else None, texttemplate="%{text}" if show_text else None,
        textfont=dict(size=count_font_size(counts)),
        colorbar=dict(title=dict(text="images", side="right"), thickness=12),
        hovertemplate="%{y}<br>class %{x}: %{z} images<extra></extra>", xgap=1, ygap=1,
    ))
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="class", type="category", tickangle=0 if c <= 20 else -60,
                     showticklabels=c <= 60)
    # At least as tall as the client chart beside it; rows stay readable up to 20 clients.
    return _base_layout(fig, "Training images per client and class", height=min(max(380, 130 + 32 * k), 700))


# The heatmap's cells share about this many pixels across (half the page on a 1280 px screen, less
# the client labels and the colour bar), measured in Chromium at 1280x800.
HEATMAP_WIDTH_PX = 220
CELL_PADDING_PX = 3  # free space on each side of a count, so it never touches the cell's edge


def count_font_size(counts: np.ndarray, width_px: float = HEATMAP_WIDTH_PX) -> int:
    """The largest font (at most 11 px) in which the widest count fits its cell with
    :data:`CELL_PADDING_PX` on each side; a digit is about 0.6 em wide."""
    counts = np.asarray(counts)
    digits = len(str(int(counts.max()))) if counts.size else 1
    cell = width_px / max(1, counts.shape[-1])
    return int(max(6, min(11, (cell - 2 * CELL_PADDING_PX) / (0.6 * digits))))


# --- clients vs references ------------------------------------------------------------------------

def client_accuracy_chart(client_accuracy: Sequence[float | None], client_sizes: Sequence[int] | None = None,
                          references: Mapping[str, float] | None = None) -> go.Figure:
    """Each client's own test accuracy as a bar, with methods (FedAvg, ensemble, ...) as lines.

    ``client_accuracy[k]`` is None while client k is not evaluated yet.
    """
    k = len(client_accuracy)
    many = k > 10  # beyond ten bars "client 12" labels would overlap: numbers under an axis title instead
    names = [str(i + 1) if many else f"client {i + 1}" for i in range(k)]
    acc = [np.nan if a is None else float(a) for a in client_accuracy]
    sizes = list(client_sizes) if client_sizes is not None else [None] * k
    hover = [f"client {i + 1}" + (f", {sizes[i]:,} training images" if sizes[i] is not None else "")
             for i in range(k)]
    fig = go.Figure(go.Bar(
        x=names, y=acc, marker_color=CLIENT_COLOUR, name="one client alone",
        # Inside the bar, at its top: a label above it would cross the reference lines.
        text=[("" if np.isnan(a) or many else f"{a:.0%}") for a in acc], textposition="inside", insidetextanchor="end",
        textfont=dict(color="#1f2937"),
        customdata=hover, hovertemplate="%{customdata}<br>test accuracy %{y:.1%}<extra></extra>",
    ))
    for name, value in (references or {}).items():
        dash = _dash(name)
        # A legend entry per reference line, drawn across the whole chart.
        fig.add_trace(go.Scatter(
            x=[names[0], names[-1]] if k else [0, 1], y=[value, value], mode="lines",
            line=dict(color=method_colour(name), width=2.5, dash=dash),
            name=f"{method_label(name)}: {value:.1%}",
            hovertemplate=f"{method_label(name)}: {value:.1%}<extra></extra>",
        ))
    fig.update_yaxes(range=[0, 1.08], tickformat=".0%", title="test accuracy")
    fig.update_xaxes(type="category", tickangle=0, title="client" if many else None)
    # The legend under the axis (and its title, with many clients), never on the tick labels.
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.24 if many else -0.14, x=0.5,
                                  xanchor="center"), bargap=0.25)
    fig = _base_layout(fig, "Accuracy of each client alone vs. combined", height=380)
    fig.update_layout(margin=dict(b=95 if many else 70))
    return fig


# --- synthetic images and the sparse mask ---------------------------------------------------------

def _to_rgb(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] (float) or 0..255 (uint8) -> ``[H, W, 3]`` uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.shape[0] == 1:
        img = np.repeat(img, 3, axis=0)
    return np.ascontiguousarray(img[:3].transpose(1, 2, 0))


def stop_palette(event: SyntheticRound) -> dict[int, str]:
    """Colour of every stop iteration that occurs in ``event`` (early stops dark, late ones bright)."""
    steps = sorted(int(s) for s in np.unique(event.stop_step) if s >= 0)
    if not steps:
        return {}
    points = [0.1] if len(steps) == 1 else list(np.linspace(0.08, 0.85, len(steps)))
    return dict(zip(steps, sample_colorscale("Plasma", points, colortype="rgb")))


def _rgb(colour: str) -> np.ndarray:
    """A plotly colour, ``"#rrggbb"`` or ``"rgb(r, g, b)"``, as a float array of 0..255."""
    colour = colour.strip()
    values = hex_to_rgb(colour) if colour.startswith("#") else unlabel_rgb(colour)
    return np.array(values, dtype=np.float32)


def mask_overlay(event: SyntheticRound, max_images: int | None = None, *, display_px: int = 168,
                 alpha: float = 0.45, tint: bool = True,
                 class_names: Sequence[str] | None = None) -> list[Image.Image]:
    """The synthetic images of one round with the sparse mask drawn over them.

    A patch that sparse inversion stopped is tinted with the colour of the iteration it was
    stopped at (:func:`stop_palette`) unless ``tint`` is off; patches still active at the end are
    left as they are. Thin lines show the patch grid. Images are upscaled (nearest neighbour) to
    about ``display_px``; with ``class_names`` a caption strip under the image names the round,
    the image and its class (so no caption covers a patch).
    """
    n_images = len(event.images) if max_images is None else min(max_images, len(event.images))
    palette = {step: _rgb(c) for step, c in stop_palette(event).items()}
    out = []
    for b in range(n_images):
        small = Image.fromarray(_to_rgb(event.images[b]))
        scale = max(1, round(display_px / max(small.size)))
        big = np.asarray(small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST),
                         dtype=np.float32).copy()
        g = event.grid
        ys = np.linspace(0, big.shape[0], g + 1).round().astype(int)
        xs = np.linspace(0, big.shape[1], g + 1).round().astype(int)
        stops = np.asarray(event.stop_step[b]).reshape(g, g)
        for r in range(g):
            for c in range(g):
                step = int(stops[r, c])
                if step >= 0 and tint:
                    cell = big[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
                    cell[:] = (1 - alpha) * cell + alpha * palette[step]
        img = Image.fromarray(big.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        line = (120, 120, 120)
        for y in ys[1:-1]:
            draw.line([(0, y), (img.width, y)], fill=line, width=1)
        for x in xs[1:-1]:
            draw.line([(x, 0), (x, img.height)], fill=line, width=1)
        # A frame in the full stop colour, so the "when" reads even where the image is bright.
        inset = max(1, scale // 2)
        for r in range(g):
            for c in range(g):
                step = int(stops[r, c])
                if step >= 0 and tint and xs[c + 1] - xs[c] > 4 * inset:
                    draw.rectangle([xs[c] + inset, ys[r] + inset, xs[c + 1] - 1 - inset, ys[r + 1] - 1 - inset],
                                   outline=tuple(int(v) for v in palette[step]), width=max(1, scale // 2))
        if class_names is not None:
            img = _with_caption(img, gallery_caption(event, b, class_names))
        out.append(img)
    return out


def png_data_uri(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI (what a plotly Image trace's ``source`` takes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _with_caption(img: Image.Image, text: str) -> Image.Image:
    """``img`` with a white strip underneath holding ``text``, in a font small enough to fit it whole."""
    # Thumbnails are shown at about half size: the font is as large as fits, and readable there.
    font_size = max(12, img.width // 8)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while font_size > 8 and measure.textlength(text, font_size=font_size) > img.width - 6:
        font_size -= 1
    strip = font_size + 10
    out = Image.new("RGB", (img.width, img.height + strip), (255, 255, 255))
    out.paste(img, (0, 0))
    ImageDraw.Draw(out).text((img.width // 2, img.height + strip // 2), text, fill=(31, 41, 55), anchor="mm",
                             font_size=font_size)
    return out


def stop_legend_html(event: SyntheticRound | None, shown: int | None = None, total: int | None = None) -> str:
    """Colour key for :func:`mask_overlay`: which colour means "stopped at iteration t"; with
    ``shown``/``total``, also how many of each round's images the gallery shows."""
    if event is None:
        return ""
    palette = stop_palette(event)
    chip = ('<span class="fm-chip"><span class="fm-swatch" style="background:{c}"></span>{t}</span>')
    if not palette:
        parts = [chip.format(c="#ffffff; border:1px solid #9ca3af", t="every patch optimised to the end "
                                                                       "(dense inversion: nothing stopped)")]
    else:
        parts = [chip.format(c=c, t=f"stopped at iteration {s} of {event.iterations}") for s, c in palette.items()]
        parts.append(chip.format(c="#ffffff; border:1px solid #9ca3af", t="never stopped (untinted)"))
    if shown is not None and total is not None:
        parts.append(f'<span class="fm-chip"><b>showing {shown} of the {total} images of each round</b></span>')
    return '<div class="fm-legend">' + "".join(parts) + "</div>"


def alt_text(event: SyntheticRound, i: int, class_names: Sequence[str] | None = None) -> str:
    """What a synthetic thumbnail shows, in words (its alt text)."""
    stopped = int((np.asarray(event.stop_step[i]) >= 0).sum())
    return (f"Synthetic image {i + 1} of round {event.round} ({method_label(event.method)}), made for "
            f"{gallery_caption(event, i, class_names).split(' · ')[1]}; {stopped} of {event.stop_step.shape[1]} "
            f"patches stopped early")


def gallery_caption(event: SyntheticRound, i: int, class_names: Sequence[str] | None = None) -> str:
    """Short, as it is drawn under the thumbnail: round, image and class, e.g. ``r2 #3 · class 7``."""
    label = int(event.labels[i])
    name = class_names[label] if class_names is not None and label < len(class_names) else str(label)
    return f"r{event.round} #{i + 1} · class {name}"


# --- information density and token relabel --------------------------------------------------------

# What each patch was taught (fedmitr.relabel.SOURCES, in order), its colour and its explanation.
TAUGHT = (
    ("label", GENERATED_COLOUR, "the generated label y (high information)"),
    ("relabel", RELABEL_COLOUR, "the ensemble's relabel (kept, low information)"),
    ("gated", "#f9d7b5", "nothing: the clients disagreed or the ensemble was unsure (gated)"),
    ("background", "#7b8794", "a stopped patch's target: its image's soft label, or the background's (relabel.stopped)"),
    ("nothing", "#e5e7eb", "nothing (stopped patch: left out of the token loss)"),
)


def _sources(event: SyntheticRound, i: int, relabel_used: bool) -> np.ndarray:
    """What each patch of image ``i`` was taught, as indices into :data:`TAUGHT`."""
    n = event.stop_step.shape[1]
    if event.token_source is not None:
        return np.asarray(event.token_source[i], dtype=int)
    if not relabel_used:  # the class token only: no patch target at all
        return np.full(n, 4)
    # Recorded before the token sources were: the generated label or the relabel.
    return np.where(np.asarray(event.token_relabelled[i], dtype=bool), 1, 0)


def relabel_map(event: SyntheticRound, i: int, class_names: Sequence[str] | None = None,
                relabel_used: bool = True, tint: bool = True) -> go.Figure:
    """Three panels for synthetic image ``i`` of ``event``: the image, each patch's information
    density (share of the ensemble's CLS attention on the kept view; stopped patches crossed out,
    the high-information set outlined), and what each patch token was taught and why.

    ``relabel_used`` is False for methods that train the class token only (patch targets unused).
    """
    if not 0 <= i < len(event.images):
        raise IndexError(f"image {i} is out of range: this round has {len(event.images)} images")
    g = event.grid
    names = list(class_names) if class_names is not None else [str(c) for c in range(int(event.token_labels.max()) + 1)]

    def name_of(label: int) -> str:
        return names[label] if 0 <= label < len(names) else str(label)

    label = int(event.labels[i])
    density = np.asarray(event.density[i], dtype=float).reshape(g, g)
    high = np.asarray(event.high_mask[i], dtype=bool).reshape(g, g)
    stops = np.asarray(event.stop_step[i]).reshape(g, g)
    stopped = stops >= 0
    token_labels = np.asarray(event.token_labels[i]).reshape(g, g)
    sources = _sources(event, i, relabel_used).reshape(g, g)
    weights = (np.asarray(event.token_weight[i], dtype=float).reshape(g, g) if event.token_weight is not None
               else np.where(sources <= 1, 1.0, 0.0))

    label_title = ("patch targets (unused: class token only)" if not relabel_used
                   else "what each patch is taught" if (sources == 1).any()
                   else "what each patch is taught (none relabelled)")
    fig = make_subplots(
        rows=1, cols=3, horizontal_spacing=0.07,
        subplot_titles=(f"synthetic image (class {name_of(label)})", "information density (kept view)", label_title),
    )
    # The same picture as the gallery's thumbnail (tinted or not), which already draws the patch grid.
    # As a PNG (a few kB), not an array of numbers (over 100 kB of JSON to send and parse).
    fig.add_trace(go.Image(source=png_data_uri(mask_overlay(event, max_images=i + 1, tint=tint)[i]),
                           hoverinfo="skip"), row=1, col=1)

    small = g <= 8
    state = np.where(stopped, np.vectorize(lambda t: f"stopped at iteration {t}")(stops), "kept to the end")
    fig.add_trace(go.Heatmap(
        z=density, colorscale="Viridis", zmin=0, showscale=True,
        colorbar=dict(thickness=10, len=0.8, x=0.635, tickformat=".0%", title=dict(text="")),
        text=np.where(stopped, "×", np.vectorize(lambda v: f"{v:.0%}")(density)) if small else None,
        texttemplate="%{text}" if small else None, textfont=dict(size=10, color="white"), customdata=state,
        hovertemplate="patch row %{y}, col %{x}<br>density %{z:.1%}<br>%{customdata}<extra></extra>", xgap=1, ygap=1,
    ), row=1, col=2)
    for r, c in zip(*np.nonzero(high)):  # outline the high-information set H
        fig.add_shape(type="rect", x0=c - 0.5, x1=c + 0.5, y0=r - 0.5, y1=r + 0.5,
                      line=dict(color="#ff5d8f", width=3), row=1, col=2)

    # A stepped colour scale: source k fills [k, k+1) of the z range.
    colourscale = [p for k, (_, colour, _) in enumerate(TAUGHT)
                   for p in ([k / len(TAUGHT), colour], [(k + 1) / len(TAUGHT), colour])]
    why = np.vectorize(lambda k: TAUGHT[k][2])(sources)
    why = np.where(stopped, np.char.add(why, np.vectorize(lambda t: f"; stopped at iteration {t}")(stops)), why)
    text = np.where(sources <= 1, np.vectorize(name_of)(token_labels),
                    np.where(sources == 3, "bg", "–")) if small else None
    fig.add_trace(go.Heatmap(
        z=sources + 0.5, zmin=0, zmax=len(TAUGHT), showscale=False, colorscale=colourscale,
        text=text, texttemplate="%{text}" if small else None, textfont=dict(size=12, color="#111827"),
        customdata=np.stack([why, np.vectorize(lambda w: f"{w:.2f}")(weights)], -1),
        hovertemplate="patch row %{y}, col %{x}<br>taught %{customdata[0]}<br>weight in the token loss "
                      "%{customdata[1]}<extra></extra>", xgap=1, ygap=1,
    ), row=1, col=3)
    for r, c in zip(*np.nonzero(stopped)):  # stopped patches: hatched, whatever they taught
        fig.add_shape(type="line", x0=c - 0.5, x1=c + 0.5, y0=r + 0.5, y1=r - 0.5,
                      line=dict(color="#6b7280", width=1), row=1, col=3)
    # Legend entries: one per kind of target that occurs, the outline of H, and the stopped mark.
    for k in sorted(set(sources.flatten().tolist())):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=TAUGHT[k][2],
                                 marker=dict(symbol="square", size=12, color=TAUGHT[k][1],
                                             line=dict(width=1, color="#9ca3af"))), row=1, col=3)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="high-information patch (H)",
                             marker=dict(symbol="square-open", size=12, color="#ff5d8f", line=dict(width=3))),
                  row=1, col=2)
    if stopped.any():
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="stopped patch (×, hatched)",
                                 marker=dict(symbol="x-thin-open", size=12, color="#6b7280", line=dict(width=2))),
                      row=1, col=2)
    for col in (2, 3):
        fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, constrain="domain", row=1, col=col)
        fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed",
                         scaleanchor=f"x{col}", row=1, col=col)
    fig.update_xaxes(showticklabels=False, showgrid=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, showgrid=False, row=1, col=1)
    method = method_label(event.method)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.04, x=0.5, xanchor="center"))
    fig = _base_layout(fig, f"{method} · round {event.round} · #{i + 1} · class {name_of(label)}", height=470)
    fig.update_layout(margin=dict(t=85, b=90, r=40))
    return fig


def relabel_summary(diagnostics: Mapping | None, class_names: Sequence[str] | None = None,
                    entry: Mapping | None = None) -> str:
    """The run's relabel diagnostics in a few lines (``metrics.json``'s ``relabel`` of a method),
    then what the patch tokens learned (from the method's ``entry``, when it has readouts)."""
    text = diagnostics_text(diagnostics, class_names)
    learned = tokens_learned_text(entry)
    return f"{text}\n\n{learned}" if text and learned else text or learned


def tokens_learned_text(entry: Mapping | None) -> str:
    """One line: the student's aux head alone on the real test images (``metrics.json``'s
    ``aux_accuracy``), against chance, and how the method predicts."""
    aux = (entry or {}).get("aux_accuracy")
    if not aux:
        return ""
    chance = 1 / max(1, len((entry.get("relabel") or {}).get("label_histogram") or [0] * 10))
    vote = entry.get("vote") or 0
    how = (f"it votes: the prediction is the class token plus {vote:g} × the aux head's largest logit over the "
           f"patch tokens ({entry['accuracy']:.1%}; the class token alone {entry['cls_accuracy']:.1%})"
           if vote else f"the prediction is the class token's alone ({entry['cls_accuracy']:.1%})")
    return (f"**What the patch tokens learned:** the aux head alone, on the real test images, is right "
            f"{aux['max']:.1%} of the time (max over tokens; {aux['mean']:.1%} with the mean; chance {chance:.0%}); "
            f"{how}.")


# --- accuracy curves ------------------------------------------------------------------------------

def accuracy_curves(curves: Mapping[str, Mapping[int, float]], references: Mapping[str, float] | None = None,
                    rounds: int | None = None) -> go.Figure:
    """Test accuracy of each inversion method's global model after every round (one line each),
    with single numbers such as FedAvg and the ensemble as horizontal reference lines.

    ``curves[method][round] = accuracy``; ``references[name] = accuracy``.
    """
    fig = go.Figure()
    last = max([rounds or 1] + [max(c) for c in curves.values() if c])
    for name, points in curves.items():
        xs = sorted(points)
        main = _is_headline(name)
        fig.add_trace(go.Scatter(
            x=xs, y=[points[r] for r in xs], mode="lines+markers", name=method_label(name),
            line=dict(color=method_colour(name), width=4 if main else 2.5),
            marker=dict(size=9 if main else 7),
            hovertemplate=f"{method_label(name)}<br>round %{{x}}: %{{y:.1%}}<extra></extra>",
        ))
    for name, value in (references or {}).items():
        dash = _dash(name)
        fig.add_trace(go.Scatter(
            x=[1, last], y=[value, value], mode="lines", name=f"{method_label(name)}: {value:.1%}",
            line=dict(color=method_colour(name), width=2, dash=dash),
            hovertemplate=f"{method_label(name)}: {value:.1%}<extra></extra>",
        ))
    if not curves:
        fig.add_annotation(text="Curves appear when an inversion method runs.",
                           x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                           font=dict(size=13, color="#6b7280"))
    fig.update_xaxes(title="round (one synthetic batch + distillation each)", range=[0.7, last + 0.3],
                     dtick=1 if last <= 20 else None)
    fig.update_yaxes(title="test accuracy", range=[0, 1.02], tickformat=".0%")
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, x=0.5, xanchor="center"))
    fig = _base_layout(fig, "Global model accuracy per round", height=400)
    fig.update_layout(margin=dict(b=90))
    return fig


# --- final table ----------------------------------------------------------------------------------

RESULT_HEADERS = ["model", "accuracy", "time (s)", "notes"]  # accuracy on the test split


def results_rows(metrics: Mapping) -> list[list]:
    """Rows of the final results table from a run's ``metrics.json`` content.

    Time is the server-side time of a method, and the local training time for the client rows.
    When the run has both the headline method and its dense inversion + KD baseline, the headline's
    note gives their difference on this run's clients (:func:`results_note` has the benchmark's).
    """
    rows = []
    paired = _run_pair(metrics)
    num_clients = len(metrics.get("clients", []))
    inversion = [n for n, m in metrics.get("methods", {}).items() if "synthetic_images" in m]
    for name, m in metrics.get("methods", {}).items():
        if "synthetic_images" in m:
            note = (f"one global model, {m['synthetic_images']} synthetic images × "
                    f"{m.get('inversion_iterations', '?')} iterations")
            if len(inversion) > 1:
                note += " (equal iterations with the other inversion methods, not equal time)"
        elif name in METHODS and not METHODS[name].makes_model:
            note = f"needs all {num_clients} client models at test time"
        else:
            note = "one global model"
        if paired is not None and name == paired[0]:
            note += f"; {100 * paired[2]:+.1f} points against {method_label(paired[1])} on the same clients (this run)"
        rows.append([method_label(name), f"{m['accuracy']:.1%}", _seconds(m["seconds"]), note])
    clients = metrics.get("clients", [])
    if clients:
        accs = [c["accuracy"] for c in clients]
        best = int(np.argmax(accs))
        rows.append(["clients (mean)", f"{np.mean(accs):.1%}", _seconds(float(np.mean([c["seconds"] for c in clients]))),
                     f"each of {len(clients)} trained alone on its own data (mean time per client)"])
        rows.append([f"best client ({clients[best]['index'] + 1})", f"{accs[best]:.1%}",
                     _seconds(clients[best]["seconds"]), "the best single local model"])
    return rows


def _run_pair(metrics: Mapping) -> tuple[str, str, float] | None:
    """(the headline method, its dense inversion + KD baseline, headline − baseline accuracy) when the
    run has both, else None."""
    from fedmitr.bench import comparison_names

    ours, base, *_ = comparison_names()
    methods = metrics.get("methods", {})
    if ours not in methods or base not in methods:
        return None
    return ours, base, methods[ours]["accuracy"] - methods[base]["accuracy"]


def results_note(metrics: Mapping, benchmark: Mapping | None) -> str:
    """The line under the results table: the benchmark's paired figure for this setting (``benchmark``,
    :func:`fedmitr.bench.benchmark_pair`), beside this run's own difference when it ran both."""
    if benchmark is None:
        return ""
    ours, base = benchmark["method"], benchmark["baseline"]
    diffs = ", ".join(f"{100 * d:+.1f}" for d in benchmark["paired"])
    mean = 100 * (benchmark["accuracy"][ours] - benchmark["accuracy"][base])
    text = (f"In the benchmark, same setting (α={benchmark['alpha']}), mean of {len(benchmark['seeds'])} seed(s), "
            f"1 thread per method: {method_label(ours)} {benchmark['accuracy'][ours]:.1%} "
            f"({_seconds(benchmark['seconds'][ours])} s) against {method_label(base)} "
            f"{benchmark['accuracy'][base]:.1%} ({_seconds(benchmark['seconds'][base])} s), {mean:+.1f} points; "
            f"per seed, on the same clients: {diffs}.")
    if _run_pair(metrics) is None:
        text += f" This run did not include {method_label(base)}."
    return text


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


# --- privacy check ---------------------------------------------------------------------------------

PRIVACY_HINT = ("After a run, click a synthetic image to see the real training image nearest to it. The server "
                "never used real images: this check runs where the data is (here, beside the simulated clients; in "
                "a real deployment each client would run it on its own data).")


def privacy_pair(synthetic: np.ndarray, real: np.ndarray, left: str, right: str, display_px: int = 140) -> Image.Image:
    """A synthetic image and its nearest real training image side by side, each with a caption."""
    panels = []
    for image, caption in ((synthetic, left), (real, right)):
        small = Image.fromarray(_to_rgb(image))
        scale = max(1, round(display_px / max(small.size)))
        panels.append(_with_caption(small.resize((small.width * scale, small.height * scale),
                                                 Image.Resampling.NEAREST), caption))
    gap = 12
    out = Image.new("RGB", (sum(p.width for p in panels) + gap, max(p.height for p in panels)), (255, 255, 255))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (panels[0].width + gap, 0))
    return out


def privacy_text(distance: Mapping[str, float], summary: Mapping | None,
                 classes: tuple[str, str] | None = None) -> str:
    """What the distances mean: this image's, and the reference of real images of the same class.
    ``classes``: (the class the synthetic image was made for, the nearest real image's class)."""
    px = distance.get("pixel", float("nan"))
    ft = distance.get("feature", float("nan"))
    text = f"**This image:** pixel distance {px:.3f} (RMS, pixels in [0, 1]), feature distance {ft:.2f}."
    if summary:
        p, f = summary["pixel"], summary["feature"]
        text += (f" **Reference:** a real training image is {p['reference_median']:.3f} (pixels) and "
                 f"{f['reference_median']:.2f} (features) from its nearest same-class neighbour (median). "
                 f"Of all this method's synthetic images, {p['closer_than_reference_p5']:.0%} are nearer to a "
                 f"real image than 95% of real images are to theirs (pixels; {f['closer_than_reference_p5']:.0%} "
                 f"in features).")
    if classes is not None and classes[0] != classes[1]:
        text += (f" **Another class:** this image was made for {classes[0]}, and the nearest real training image "
                 f"is a {classes[1]}. The search runs over every class: the nearest image in pixels is the one "
                 f"with the most ink in the same places, whatever its digit, since a synthetic image draws its "
                 f"class in a few strokes a person would not read. A nearest image of another class is a sign "
                 f"that no training image of its own class was copied.")
    return text + " " + PRIVACY_HINT.split(". ", 1)[1]


# --- a shared checkpoint on test images ------------------------------------------------------------

def attention_overlay(image: np.ndarray, attention: np.ndarray, grid: int, caption: str, *,
                      display_px: int = 168, alpha: float = 0.5) -> Image.Image:
    """A test image with the class token's attention on each patch as a heat tint, and a caption."""
    small = Image.fromarray(_to_rgb(image))
    scale = max(1, round(display_px / max(small.size)))
    big = np.asarray(small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST),
                     dtype=np.float32).copy()
    att = np.asarray(attention, dtype=np.float32).reshape(grid, grid)
    att = (att - att.min()) / max(float(att.max() - att.min()), 1e-8)
    ys = np.linspace(0, big.shape[0], grid + 1).round().astype(int)
    xs = np.linspace(0, big.shape[1], grid + 1).round().astype(int)
    colours = sample_colorscale("Inferno", [float(v) for v in att.flatten()], colortype="rgb")
    for k, colour in enumerate(colours):
        r, c = divmod(k, grid)
        cell = big[ys[r]:ys[r + 1], xs[c]:xs[c + 1]]
        cell[:] = (1 - alpha) * cell + alpha * _rgb(colour)
    return _with_caption(Image.fromarray(big.clip(0, 255).astype(np.uint8)), caption)
