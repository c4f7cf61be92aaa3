"""models/dispatch_count.py sees every kind of host sync on a CPU, counts nothing that stays on the
device, and `python -m train bench_dispatch` writes its rows (ours and transformers' on the same weights)."""

import json

import pytest
import torch

from models.dispatch_count import count_dispatch

x = torch.arange(6.0)
mask = x > 2
counts = torch.tensor([1, 2, 3])

SYNCS = {
    "item": lambda: x[0].item(),
    "item ": lambda: int(x.sum()),  # (a second way to the same kind)
    "item  ": lambda: bool(x.any()),
    "item   ": lambda: range(counts[0]),  # __index__
    "nonzero": lambda: mask.nonzero(),
    "bool_index": lambda: x[mask],
    "bool_index ": lambda: x.clone().__setitem__(mask, 0.0),
    "masked_select": lambda: x.masked_select(mask),
    "repeat_interleave": lambda: torch.repeat_interleave(counts),
    "unique": lambda: counts.unique(),
    "bincount": lambda: counts.bincount(),
    "equal": lambda: torch.equal(x, x),
    "tolist": lambda: x.tolist(),
    "numpy": lambda: x.numpy(),
    "host_to_device": lambda: torch.tensor([1, 2], device=x.device),
}


@pytest.mark.parametrize("kind", SYNCS, ids=str.strip)
def test_every_kind_of_sync_is_seen_with_its_site(kind):
    with count_dispatch() as census:
        SYNCS[kind]()
    assert census.syncs[kind.strip()] == 1 and census.n_syncs == 1, census.syncs
    (site,) = census.sites[kind.strip()]
    assert site.startswith("tests/test_dispatch_count.py:")


def test_fixed_size_device_work_is_not_a_sync():
    with count_dispatch() as census:
        torch.repeat_interleave(torch.arange(3), counts, output_size=6)
        torch.nonzero_static(mask, size=3)
        torch.where(mask, x, 0.0).sort().values.cumsum(0)
        torch.zeros(3).scatter_add_(0, counts - 1, torch.ones(3))
        torch.tensor([1, 2])  # host data staying on the host
    assert census.n_syncs == 0, census.describe()
    assert census.n_ops >= 8 and census.ops["nonzero_static"] == 1


def test_bench_dispatch_rows_and_results_file(tmp_path):
    from train.tools.bench_dispatch import run_bench_dispatch

    rows = run_bench_dispatch(["dense", "vica"], ["bench_dispatch.models=[tiny]", "bench_dispatch.batch=2", "bench_dispatch.n_text=8",
                                                  f"bench_dispatch.out={tmp_path}"])
    assert [(r["arch"], r["runner"]) for r in rows] == [("dense", "ours"), ("vica", "ours"), ("dense", "hf")]
    for r in rows:
        assert r["family"] == "llava" and r["n_visual"] == [256, 256]
        for step in ("prefill", "decode", "train"):
            assert r[step]["ops"] > 0 and r[step]["syncs"] == sum(r[step]["by_kind"].values())
        assert r["decode_graph_breaks"] == len(r["break_reasons"]) == 0
    dense, vica, hf = rows
    assert vica["prefill"]["ops"] < dense["prefill"]["ops"]  # ViCA's layers skip the visual tokens' work
    assert all(r[step]["syncs"] == 0 for r in (dense, vica) for step in ("prefill", "decode", "train"))  # sizes from the host
    assert dense["decode"]["ops"] <= hf["decode"]["ops"] and hf["prefill"]["syncs"] > 0
    (results,) = tmp_path.glob("dispatch-*.json")
    assert json.loads(results.read_text())["rows"] == rows
