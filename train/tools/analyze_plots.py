"""Figures for `python -m train analyze`: one per analysis, readable without the code.

Every figure says in its title what was changed and what was measured, labels its axes with units,
and marks what the analysis chose. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

KL_LABEL = {"mod_base": "KL(p_changed ‖ p_model)", "base_mod": "KL(p_model ‖ p_changed)"}
CHOSEN, OTHER, TEXT = "#d62728", "#1f77b4", "#7f7f7f"


def kl_axis_label(direction: str) -> str:
    return f"{KL_LABEL[direction]} of the next token, nats"


def _scale(ax, values: Sequence[float]) -> None:
    """Symmetric-log y axis when values span decades (exact zeros stay visible)."""
    positive = [v for v in values if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("symlog", linthresh=min(positive), linscale=0.5)


def _legend_below(ax, **kw) -> None:
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False, **kw)


def _layers_axis(ax, depth: int) -> None:
    ax.set_xlabel("decoder layer (0 = first)")
    ax.set_xticks(range(depth))
    ax.set_xlim(-0.6, depth - 0.4)
    ax.grid(axis="y", alpha=0.3)


def shortv_figure(visual: Sequence[float], text: Sequence[float] | None, frozen: Sequence[int], n: int, direction: str) -> Figure:
    depth = len(visual)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.4 * depth + 4), 4.8))
    width = 0.4 if text is not None else 0.8
    shift = -width / 2 if text is not None else 0.0
    colors = [CHOSEN if i in frozen else OTHER for i in range(depth)]
    ax.bar([i + shift for i in range(depth)], visual, width, color=colors)
    if text is not None:
        ax.bar([i + width / 2 for i in range(depth)], text, width, color=TEXT)
    _scale(ax, list(visual) + list(text or []))
    _layers_axis(ax, depth)
    ax.set_ylabel(kl_axis_label(direction))
    ax.set_title(f"ShortV Layer Contribution over {n} samples: freeze one token type in one layer,\n"
                 f"measure the change of the next-token distribution (low = layer is redundant)", fontsize=9)
    handles = [Patch(color=CHOSEN, label=f"visual tokens frozen in layer i: chosen to freeze ({len(frozen)} lowest)"),
               Patch(color=OTHER, label="visual tokens frozen in layer i: kept dense")]
    if text is not None:
        handles.append(Patch(color=TEXT, label="text tokens frozen in layer i (reference)"))
    _legend_below(ax, handles=handles)
    fig.tight_layout()
    return fig


def vtw_figure(curve: Sequence[float], eta: float, min_layer: int, k: int | None, n: int, direction: str) -> Figure:
    depth = len(curve)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.4 * depth + 4), 4.8))
    ax.plot(range(depth), curve, "o-", color=OTHER, label="all visual tokens withdrawn before layer K")
    ax.axhline(eta, color="black", ls="--", lw=1, label=f"threshold η = {eta:g}")
    if min_layer > 0:
        ax.axvspan(-0.6, min_layer - 0.5, color=TEXT, alpha=0.15, label=f"not searched (K < {min_layer})")
    if k is not None:
        ax.plot([k], [curve[k]], "o", ms=12, mfc="none", mec=CHOSEN, mew=2, label=f"chosen K = {k} (first K ≥ {min_layer} with KL ≤ η)")
    _scale(ax, list(curve) + [eta])
    _layers_axis(ax, depth)
    ax.set_xlabel("withdrawal layer K (visual tokens leave before it)")
    ax.set_ylabel(kl_axis_label(direction))
    verdict = f"K = {k}" if k is not None else "no layer qualifies: raise η"
    ax.set_title(f"VTW withdrawal search over {n} samples: how much the next token changes when\n"
                 f"visual tokens leave before layer K ({verdict})", fontsize=9)
    _legend_below(ax)
    fig.tight_layout()
    return fig


def vica_figure(kl: Sequence[float], t2v: Sequence[int], n: int, direction: str) -> Figure:
    depth = len(kl)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.4 * depth + 4), 4.8))
    ax.bar(range(depth), kl, 0.8, color=[CHOSEN if i in t2v else OTHER for i in range(depth)])
    _scale(ax, kl)
    _layers_axis(ax, depth)
    ax.set_ylabel(kl_axis_label(direction))
    ax.set_title(f"ViCA layer choice over {n} samples: text cannot read visual tokens in layer i\n"
                 f"(high = text reads the image there; the {len(t2v)} highest become T2V layers)", fontsize=9)
    _legend_below(ax, handles=[Patch(color=CHOSEN, label="chosen T2V layer (text reads visual tokens)"),
                               Patch(color=OTHER, label="text-only layer in the ViCA plan")])
    fig.tight_layout()
    return fig


def yopo_figure(activity, votes, kept: Sequence[Sequence[int]], tau: float, vote: float, full_layers: int, n: int) -> Figure:
    """activity/votes: [L, H] arrays (mean visual/text attention-mass ratio, share of samples > tau)."""
    depth, heads = len(activity), len(activity[0])
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.5 * heads * 2 + 4), max(3.5, 0.35 * depth + 2)))
    panels = [(activity, "mean visual/text attention-mass ratio", "viridis", None),
              (votes, f"share of the {n} samples with ratio > τ = {tau:g}", "magma", (0, 1))]
    for ax, (data, label, cmap, lim) in zip(axes, panels):
        im = ax.imshow(data, aspect="auto", cmap=cmap, origin="lower", vmin=lim[0] if lim else None, vmax=lim[1] if lim else None)
        fig.colorbar(im, ax=ax, label=label)
        ax.set_xlabel("attention head")
        ax.set_ylabel("decoder layer (0 = first)")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(depth))
        for layer, hs in enumerate(kept):
            for h in hs:
                ax.plot(h, layer, "s", ms=9, mfc="none", mec="white" if cmap == "viridis" else "cyan", mew=1.5)
    axes[0].set_title("head activity on visual tokens", fontsize=9)
    axes[1].set_title(f"majority vote (kept: share > {vote:g}, squares)", fontsize=9)
    total = sum(len(h) for h in kept)
    fig.suptitle(f"YOPO head masks from {n} samples: {total} of {depth * heads} (layer, head) pairs keep touching visual tokens "
                 f"(squares;\nlayers < {full_layers} keep every head, a layer with no voted head keeps its most active one)", fontsize=10)
    fig.tight_layout()
    return fig


def visipruner_figure(mass: Sequence[float], min_cos: Sequence[float], n_tokens: Sequence[float], stages: dict,
                      layer_threshold: float, token_threshold: float, n: int) -> Figure:
    depth = len(mass)
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.4 * depth + 4), 9.0), sharex=True)
    impact = [max(1.0 - c, 1e-12) for c in min_cos]
    axes[0].plot(range(depth), mass, "o-", color=OTHER)
    axes[0].set_ylabel("attention mass of the\nlast prompt token on\nvisual tokens (mean)")
    axes[1].semilogy(range(depth), impact, "o-", color=OTHER, label="largest single-token impact, 1 − min_j cos(o, o − c_j)")
    axes[1].axhline(1 - layer_threshold, color="black", ls="--", lw=1, label=f"filtering threshold 1 − {layer_threshold:g}")
    axes[1].set_ylabel("impact on the last\ntoken's attention output\n(median over samples)")
    axes[1].legend(fontsize=7, loc="best")
    axes[2].plot(range(depth), n_tokens, "o-", color=OTHER)
    axes[2].set_ylabel(f"visual tokens with\n‖c_j‖ > {token_threshold:g} (mean)")
    if "shallow" in stages:
        how = "" if stages.get("detected") else " (fallback: paper's boundaries)"
        bounds = [(0, stages["shallow"], "shallow: text reads vision only via a sink (layer 0) or not" + how, "#2ca02c"),
                  (stages["shallow"], stages["middle"], "fusion: all tokens read", "#ff7f0e"),
                  (stages["middle"], stages["exit"], "middle: few kept tokens", CHOSEN),
                  (stages["exit"], depth, "deep: vision withdrawn", TEXT)]
        for ax in axes:
            for lo, hi, label, color in bounds:
                ax.axvspan(lo - 0.5, hi - 0.5, color=color, alpha=0.12, label=label if ax is axes[0] else None)
        axes[0].legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    _layers_axis(axes[2], depth)
    fig.suptitle(f"VisiPruner stages over {n} samples: how the last prompt token uses visual tokens in each layer\n"
                 "(value-aware contribution c_j = concat_h P[last, j]·V_j; stage boundaries = medians of per-sample detections)", fontsize=9)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
