"""``usp-bench balance``: per-rank work counted from the layouts' positions equals a brute
count over the oracle's mask, and the document-length mixes it draws are well formed."""

import json

import pytest
import torch

from usp.attention.layout import LAYOUTS, ring_positions
from usp.attention.naive import document_mask
from usp.bench.balance import document_offsets, imbalance, parse_documents, rank_work


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("documents, window", [(None, (None, 0)), ((0, 24, 24, 32, 64), (None, 0)),
                                               ((0, 8, 64), (5, 0)), (None, (9, 0))])
@pytest.mark.parametrize("cut", [True, False])
def test_rank_work_counts_the_visible_pairs(layout, documents, window, cut):
    cu = torch.tensor(documents or (0, 64), dtype=torch.int32)
    mask = document_mask(cu, cu, causal=True, window_size=(-1 if window[0] is None else window[0], 0))
    brute = [int(mask[ring_positions(64, 4, rank, layout, documents if cut else None)].sum()) for rank in range(4)]
    assert rank_work(64, 4, layout, documents, window, cut) == brute


def test_zigzag_per_document_balances_where_zigzag_over_the_sequence_does_not():
    documents = document_offsets(parse_documents("lognormal:mean=64,sigma=1"), 1024, 8, seed=3)
    assert imbalance(rank_work(1024, 4, "zigzag", documents)) == 1.0
    assert imbalance(rank_work(1024, 4, "zigzag", documents, cut_documents=False)) > 1.05
    assert imbalance(rank_work(1024, 4, "contiguous")) == pytest.approx(1.75, abs=0.01)


def test_document_mixes():
    offsets = document_offsets(parse_documents("lognormal:mean=100,sigma=0.5"), 4096, 8, seed=1)
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0 and offsets[-1] == 4096 and all(n > 0 and n % 8 == 0 for n in lengths)
    assert 60 < sum(lengths) / len(lengths) < 160
    assert offsets == document_offsets(parse_documents("lognormal:mean=100,sigma=0.5"), 4096, 8, seed=1)
    assert document_offsets(parse_documents("fixed:1000"), 4096, 8, seed=0) == (0, 1000, 2000, 3000, 4000, 4096)


@pytest.mark.parametrize("spec", ["fixed:0", "lognormal:sigma=1", "uniform:5", "lognormal:mean=-3"])
def test_bad_document_mixes_are_refused(spec):
    with pytest.raises(ValueError, match="documents must be fixed:N or lognormal:mean=M"):
        parse_documents(spec)


def test_the_command_writes_imbalance_and_traffic(tmp_path, capsys):
    from usp.bench.__main__ import main
    assert main(["balance", "--seqlen", "512", "--ring-degree", "2", "4", "--docs", "fixed:96",
                 "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("balance-*.json")
    document = json.loads(path.read_text())
    by = {(r["ring_degree"], r["mix"], r["layout"]): r for r in document["records"]}
    assert by[4, "dense", "contiguous"]["imbalance"] == pytest.approx(1.75, abs=0.01)
    assert by[4, "documents", "zigzag"]["imbalance"] == 1.0
    assert {(t["ring_degree"], t["schedule"]) for t in document["traffic"]} == {
        (r, s) for r in (2, 4) for s in ("ring", "allgather")}
    assert "ring   4: imbalance dense contiguous 1.7" in capsys.readouterr().out
