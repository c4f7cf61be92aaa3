"""Learned layer skipping for visual tokens: the routers of `LayerPolicy.route` and how a routed layer
gets its tokens (Mixture-of-Depths for MLLMs: p-MoD, arXiv 2412.04449; gamma-MoD, arXiv 2410.13859).

Before a routed layer its router scores every visual token; per image the best `budget(n)` enter the
layer (ties go to the earlier token, so the set is a function of the scores alone) and the others are
absent from it: the layer runs on the text stream plus the kept tokens (models/decoder.py does not know
the difference, it only weighs the kept tokens' FFN output), and the skipped tokens come back at the
next layer unchanged or scaled by their gate (`Route.skipped`). Layout tokens always enter, text is
never routed.

Everything that decides the kept set happens here, outside the decoder layer's (possibly
checkpointed) call, so recomputation in backward sees the very same tokens. Budgets are computed on
the device; only the padded width of each routed layer's visual stream (the most tokens a row keeps)
is read back, once per forward for every routed layer together (again only after a selection or a
drop changed the visual tokens), never once per layer.

Every router runs in every forward, also on an empty visual stream, and its scores join the auxiliary
loss at least with weight 0, so data-parallel ranks with and without images (or the last layer's
router, whose gate reaches no loss) all take part in the same gradient reductions (DDP, ZeRO, FSDP).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gathered import gathered
from .plan import Plan, Route
from .selection import ranked_keep
from .streams import Stream


class Router(nn.Linear):
    """`Linear(d, 1)` with weight and bias zero: every score starts at 0 (the gate at its initial value,
    ties broken by position). Called on [B, V, d], returns the scores [B, V]."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1)
        with gathered(self.parameters()):
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    def forward(self, h: Tensor) -> Tensor:
        return super().forward(h).squeeze(-1)


def build_routers(plan: Plan, hidden_size: int, existing: nn.ModuleDict) -> dict[str, Router]:
    """The routers `plan` needs that `existing` lacks, by name (`Plan.routers`)."""
    return {name: Router(hidden_size) for name in dict.fromkeys(plan.routers.values()) if name not in existing}


def gate(route: Route, scores: Tensor) -> Tensor:
    """The router weight w of each score: 1 + scale * tanh(s) (p-MoD) or sigmoid(s) (gamma-MoD)."""
    if route.gate == "tanh":
        return 1 + route.gate_scale * torch.tanh(scores)
    return torch.sigmoid(scores)


def budgets(route: Route, n: Tensor) -> Tensor:
    """`Route.budget` of every count in `n` (long), on its device."""
    x = n.double() * route.keep
    k = torch.floor(x + 1e-9) if route.rounding == "floor" else torch.ceil(x - 1e-9)
    return torch.minimum(n, torch.clamp(k.long(), min=route.min_keep))


class Routed(NamedTuple):
    """A routed layer's tokens: `kept` enter the layer (`index` [B, K] into the full visual stream,
    padded with `kept.valid=False`), `weight` [B, K] multiplies their FFN output, `skip` [B, V] (or None)
    the state of the tokens that skip it."""

    kept: Stream
    index: Tensor
    weight: Tensor
    skip: Tensor | None


class RouteStats(NamedTuple):
    """One routed layer in one forward: the fraction of the candidates that entered and their mean
    gate (detached), and the layer's auxiliary loss term (with gradient; weight 0 without `aux`)."""

    keep: Tensor
    weight: Tensor
    aux: Tensor


class Routing:
    """The routing of one forward pass (prefill or training): call `enter` before a routed layer and
    `leave` after it; `stats` collects what each routed layer did and `aux_loss` sums its auxiliary terms."""

    def __init__(self, plan: Plan, routers: nn.ModuleDict, eps: float):
        self.plan, self.routers, self.eps = plan, routers, eps
        self.stats: dict[int, RouteStats] = {}
        self._widths: dict[Route, int] = {}
        self._widths_of: Tensor | None = None  # the `valid` tensor of the visual stream the widths were read for

    def enter(self, layer: int, vis: Stream, width: int | None = None) -> Routed:
        """The tokens of `vis` that enter routed layer `layer`: a stream `width` wide (the host's count of
        the most a row keeps: models/host_sizes.py; None: read back)."""
        route = self.plan.layers[layer].route
        h = vis.h
        if route.router_input == "normed":
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps).to(h.dtype)
        scores = self.routers[self.plan.routers[layer]](h)  # every rank, every forward: see the module docstring
        candidates = vis.valid & ~vis.extra
        n = per_image(vis.image, candidates)
        keep = ranked_keep(scores, vis.image, candidates, budgets(route, n)) | (vis.valid & vis.extra)
        width = self._width(route, vis, n) if width is None else min(width, vis.n) if vis.n else 0
        index = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        entered = torch.arange(index.shape[1], device=index.device)[None] < keep.sum(1, keepdim=True)
        w = torch.where(candidates, gate(route, scores), torch.ones_like(scores))
        self._note(layer, route, scores, w, keep, candidates)
        return Routed(vis.gather(index, entered), index, torch.gather(w, 1, index), w if route.skipped == "scaled" else None)

    def leave(self, vis: Stream, routed: Routed, out: Stream) -> Stream:
        """The full visual stream after the layer: the kept tokens' outputs in their slots, the
        skipped ones (and the kept stream's padding) as they entered, times `skip`."""
        base = vis.h if routed.skip is None else vis.h * routed.skip[..., None]
        index = routed.index[..., None].expand(-1, -1, base.shape[-1])
        back = torch.where(routed.kept.valid[..., None], out.h, torch.gather(base, 1, index))
        return vis.with_h(base.scatter(1, index, back))

    @property
    def aux_loss(self) -> Tensor | None:
        return sum(s.aux for s in self.stats.values()) if self.stats else None

    def _width(self, route: Route, vis: Stream, n: Tensor) -> int:
        """The most visual tokens a row keeps under `route`: read once for every routed layer's budget
        (again after the visual tokens changed), one small device -> host copy."""
        if self._widths_of is not vis.valid:
            routes = list(dict.fromkeys(p.route for p in self.plan.layers if p.route is not None))
            extra = (vis.valid & vis.extra).sum(1)
            rows = torch.stack([budgets(r, n).sum(1) + extra for r in routes]) if vis.n else extra.new_zeros(len(routes), 1)
            self._widths = {r: max(1, int(w)) for r, w in zip(routes, rows.amax(1).tolist())}
            self._widths_of = vis.valid
        return min(self._widths[route], vis.n) if vis.n else 0

    def _note(self, layer: int, route: Route, scores: Tensor, w: Tensor, keep: Tensor, candidates: Tensor) -> None:
        total = candidates.sum().clamp(min=1)
        aux = scores.sum() * 0.0  # joins the gradient reductions even where nothing is routed
        if route.aux > 0 and scores.numel():
            aux = aux + route.aux * F.binary_cross_entropy_with_logits(  # over the candidates (weight 0 elsewhere)
                scores.float(), keep.float(), weight=candidates.float(), reduction="sum") / total
        kept = (keep & candidates).sum() / total
        self.stats[layer] = RouteStats(kept.detach(), (w.detach() * candidates).sum() / total, aux)


def per_image(image: Tensor, candidates: Tensor) -> Tensor:
    """[B, V] candidates of each image of each row (images numbered from 0 within a row; V bounds them)."""
    n = torch.zeros(image.shape, dtype=torch.long, device=image.device)
    return n.scatter_add_(1, image.clamp(0, max(image.shape[1] - 1, 0)), candidates.long())
