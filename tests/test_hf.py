"""transformers models trained with USP (``usp.attention.hf``): loss and parameters equal
to the same model trained on one process with transformers' own attention, for every
mesh kind (Ulysses, USP, ring, data parallel x ring) and the three layouts; and bad input
refused on every rank.

Tolerance rule: in float64 every step's loss and the first step's gradients agree to
1e-10 relative (rounding is ~1e-16; a wrong label shift or loss normalisation moves the
loss by 1e-2 or more; a wrong gradient scale, which AdamW nearly hides from the losses,
moves the gradients by its factor), parameters to 1e-10 of their largest magnitude; in
float32 losses and gradients to 1e-4.
"""

import copy
import types

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from errors import error_of  # noqa: E402

from usp.bench.launch import free_port, run  # noqa: E402
from usp.bench.train import (PARITY_BAR, TrainSetup, build_model, compare, rank_main, reference_run,  # noqa: E402
                             training_flops)

CONFIGS = [(4, 1, "zigzag"), (2, 2, "zigzag"), (2, 2, "contiguous"), (2, 2, "stripe"), (1, 4, "zigzag"),
           (1, 4, "contiguous"), (1, 4, "stripe"), (1, 2, "zigzag"), (1, 2, "contiguous")]
# on 4 ranks; (1, 2): data parallel 2 x ring 2


def _setup(dtype: str, steps: int, family: str = "llama", zero: bool = False) -> TrainSetup:
    return TrainSetup(family, vocab=64, hidden=32, ffn_hidden=64, layers=2, heads=4, kv_heads=2, seqlen=32, batch=2,
                      steps=steps, lr=3e-3, seed=0, dtype=dtype, zero=zero)


def _parity(setup: TrainSetup, configs, per_rank=None) -> list[dict]:
    """Train with USP (``per_rank``: its results, else trained here on 4 ranks) and on one process; compare."""
    reference = reference_run(setup, torch.device("cpu"))
    per_rank = per_rank or run(4, rank_main, (setup, configs), pg_timeout_s=60.0)
    records = compare(setup, reference, per_rank, configs, world_size=4)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains
    return records


def _assert_parity(records, bar: float, parameter_bar: float) -> None:
    for record in records:
        assert record["max_relative_difference"] <= bar, record["name"]
        assert record["first_step_gradient_difference"] <= bar, record["name"]
        assert record["max_relative_parameter_difference"] <= parameter_bar, record["name"]
        assert record["parity"] is True


def _train_and_refuse(setup: TrainSetup) -> tuple[list[dict], dict, dict]:
    """On each of 4 ranks: the USP training runs, the bad inputs, and packed documents (one launch)."""
    return rank_main(setup, CONFIGS), _bad_inputs(), _packed_documents()


@pytest.fixture(scope="module")
def four_ranks():
    setup = _setup("fp64", steps=3)
    per_rank, refusals, packed = zip(*run(4, _train_and_refuse, (setup,), pg_timeout_s=60.0))
    return setup, list(per_rank), list(refusals), list(packed)


def test_training_with_usp_matches_one_process_in_float64(four_ranks):
    setup, per_rank = four_ranks[:2]
    records = _parity(setup, CONFIGS, per_rank)
    assert [r["name"] for r in records] == ["u4r1", "u2r2-zigzag", "u2r2-contiguous", "u2r2-stripe", "u1r4-zigzag",
                                            "u1r4-contiguous", "u1r4-stripe", "dp2-u1r2-zigzag",
                                            "dp2-u1r2-contiguous"]
    _assert_parity(records, PARITY_BAR["fp64"], 1e-10)


@pytest.mark.slow
def test_training_with_usp_matches_one_process_over_longer_runs():
    """The bars over the command's lengths: 20 steps in float64 (other model families
    too), 50 in float32; and with ZeRO-1 sharding of the optimizer state."""
    _assert_parity(_parity(_setup("fp64", steps=20), CONFIGS), PARITY_BAR["fp64"], 1e-10)
    for family in ("mistral", "qwen2"):
        _assert_parity(_parity(_setup("fp64", steps=5, family=family), CONFIGS[1:2]), PARITY_BAR["fp64"], 1e-10)
    _assert_parity(_parity(_setup("fp32", steps=50), CONFIGS), PARITY_BAR["fp32"], 1e-3)
    _assert_parity(_parity(_setup("fp64", steps=5, zero=True), CONFIGS[1:2] + CONFIGS[-1:]), PARITY_BAR["fp64"],
                   1e-10)  # the optimizer state sharded over the 4 ranks (ZeroRedundancyOptimizer)


def test_training_flops_count_linear_weights_and_attention():
    """Worked by hand for the test model: per layer q 32x32, k and v 32x16, o 32x32, gate,
    up and down 32x64: 9216 weights; 2 layers and lm_head 64x32: 20480; 6 FLOPs each per
    token over 2 x 32 tokens, plus per layer causal attention 4·2·4·32·32·8 / 2 x 3.5."""
    setup = _setup("fp32", steps=1)
    assert training_flops(build_model(setup, torch.device("cpu")), setup) == 6 * 20480 * 64 + 2 * 458752


def _bad_inputs() -> dict:
    """Each bad call; every rank must raise."""
    from usp.attention.hf import all_reduce_gradients, sequence_parallel, sequence_parallel_loss, shard_batch
    from usp.comm import init_mesh

    mesh = init_mesh(1, 2)  # dp 2 x ring 2 on 4 ranks
    ulysses = init_mesh(2, 1)
    ids = torch.arange(16).view(2, 8)
    setup = _setup("fp32", 1)
    model = sequence_parallel(build_model(setup, torch.device("cpu")), mesh)
    shard = shard_batch(mesh, ids)
    one_head = build_model(TrainSetup(**{**setup.__dict__, "heads": 1, "kv_heads": 1}), torch.device("cpu"))
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    errors = {
        "labels_length": error_of(lambda: shard_batch(mesh, ids, ids[:, :6])),
        "odd_length": error_of(lambda: shard_batch(mesh, ids[:, :6])),
        "padding": error_of(lambda: shard_batch(mesh, ids, attention_mask=(ids % 7 != 0).long())),
        "different_batches": error_of(lambda: shard_batch(mesh, ids + mesh.ring_rank)),
        "not_2d": error_of(lambda: shard_batch(mesh, ids[0])),
        "heads": error_of(lambda: sequence_parallel(one_head, ulysses)),
        "mask_4d": error_of(lambda: model(input_ids=shard["input_ids"], position_ids=shard["position_ids"],
                                          attention_mask=mask)),
        "no_positions": error_of(lambda: model(input_ids=shard["input_ids"])),
        "other_layout": error_of(lambda: model(input_ids=shard["input_ids"],
                                               position_ids=shard_batch(mesh, ids, layout="stripe")["position_ids"])),
        "restarting_positions": error_of(lambda: shard_batch(mesh, ids, position_ids=ids % 4)),
        "offset_positions": torch.equal(shard_batch(mesh, ids, position_ids=ids + 5)["position_ids"],
                                        shard["input_ids"] + 5),  # ids count up by one along each row
        "documents_batch_2": error_of(lambda: shard_batch(mesh, ids, cu_seqlens=torch.tensor([0, 4, 8],
                                                                                         dtype=torch.int32))),
        "documents_positions": error_of(lambda: shard_batch(mesh, ids[:1], position_ids=ids[:1],
                                                            cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))),
        "documents_uncut": error_of(lambda: shard_batch(mesh, ids[:1], cu_seqlens=torch.tensor([0, 2, 8],
                                                                                              dtype=torch.int32))),
        "loss_shapes": error_of(lambda: sequence_parallel_loss(torch.zeros(2, 3, 64), shard["shift_labels"], mesh)),
        "mesh_type": error_of(lambda: all_reduce_gradients(model, mesh.sp_group)),
    }
    # what a correct call gives: the shifted labels of the global sequence, this rank's positions
    from usp.attention import sequence_positions
    positions = sequence_positions(8, mesh)
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    errors["shard_ok"] = bool(torch.equal(shard["position_ids"][0], positions)
                              and torch.equal(shard["input_ids"], ids[:, positions])
                              and torch.equal(shard["shift_labels"], shifted[:, positions]))
    # the loss value is bit-identical on every rank (ranks may branch on it)
    logits = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(mesh.rank), dtype=torch.float64)
    errors["loss_value"] = sequence_parallel_loss(logits, shard["shift_labels"], mesh).item()
    # a parameter with a gradient on rank 0 only: summed as zeros elsewhere; none anywhere: stays None
    layer = torch.nn.Linear(2, 2, bias=True)
    if mesh.rank == 0:
        layer.weight.grad = torch.ones(2, 2)
    all_reduce_gradients(layer, mesh)
    errors["gradients"] = (layer.weight.grad.tolist(), layer.bias.grad)
    return errors


def test_bad_input_is_refused_on_every_rank(four_ranks):
    first, second, third, fourth = four_ranks[2]
    # the same verdict on every rank; the disagreement names the ranks of each sequence-parallel group
    assert first == second and third == fourth
    assert {k: v for k, v in first.items() if k != "different_batches"} == \
        {k: v for k, v in third.items() if k != "different_batches"}
    assert "rank 2: input_ids=" in third["different_batches"] and "rank 3: input_ids=" in third["different_batches"]
    assert first["shard_ok"] is True
    assert "labels must have the shape of input_ids (2, 8)" in first["labels_length"]
    assert "sequence length 6 must be divisible by 2 x ring_degree = 4" in first["odd_length"]
    assert "attention_mask masks some tokens" in first["padding"]
    assert first["different_batches"].startswith("ValueError") and "input_ids" in first["different_batches"]
    assert "input_ids must be a [batch, seqlen] tensor" in first["not_2d"]
    assert "must be at least the Ulysses degree (2)" in first["heads"]
    assert "does not support a 4-D attention mask" in first["mask_4d"]
    assert "do not match" in first["loss_shapes"]
    assert "mesh must be a usp.comm.Mesh" in first["mesh_type"]
    assert "needs position_ids=shard['position_ids'] from shard_batch" in first["no_positions"]
    assert "not this rank's positions in the zigzag layout" in first["other_layout"]
    assert "or restart at each document of cu_seqlens: pass cu_seqlens" in first["restarting_positions"]
    assert first["offset_positions"] is True  # counting up from another start: sharded as given
    assert "packed documents (cu_seqlens) need batch 1, got 2 rows" in first["documents_batch_2"]
    assert "they do not match cu_seqlens" in first["documents_positions"]
    assert "document 0 has 2 tokens, pad it to 4" in first["documents_uncut"]
    assert first["loss_value"] == third["loss_value"]
    assert first["gradients"] == ([[1.0, 1.0], [1.0, 1.0]], None)


def test_one_rank_sums_no_gradients():
    """all_reduce_gradients on a one-rank mesh (a one-process gloo group in this process),
    with every collective and concatenation made to fail: the gradients stay as they are."""
    from unittest import mock

    import torch.distributed as dist

    from usp.attention.hf import all_reduce_gradients
    from usp.comm import init_mesh

    layer = torch.nn.Linear(2, 2, bias=True)
    grad = layer.weight.grad = torch.full((2, 2), 3.0)
    refuse = mock.Mock(side_effect=AssertionError("nothing to sum on one rank"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_mesh(1, 1)
        with mock.patch.object(torch, "cat", refuse), mock.patch.object(dist, "all_reduce", refuse):
            all_reduce_gradients(layer, mesh)
    finally:
        dist.destroy_process_group()
    assert layer.weight.grad is grad and layer.weight.grad.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    assert layer.bias.grad is None


def _packed_documents() -> dict:
    """One packed sequence (documents of 12, 4 and 16 tokens) through a float64 LLaMA on
    each mesh, against the same model run on each document alone with transformers' SDPA
    attention (an independent oracle: no packing, positions 0..n-1 per document): the
    loss over every next-token label inside a document, and every parameter's gradient."""
    from usp.attention.hf import all_reduce_gradients, sequence_parallel, sequence_parallel_loss, shard_batch
    from usp.comm import init_mesh

    setup = _setup("fp64", 1)
    base = build_model(setup, torch.device("cpu"))
    ids = torch.randint(0, setup.vocab, (1, 32), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 12, 16, 32], dtype=torch.int32)
    reference = copy.deepcopy(base)
    total, count = 0.0, 0
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        logits = reference(input_ids=ids[:, a:b], use_cache=False).logits
        total = total + F.cross_entropy(logits[0, :-1], ids[0, a + 1:b], reduction="sum")
        count += b - a - 1
    expected = total / count
    expected.backward()
    results = {}
    for u, r, layout in ((2, 2, "zigzag"), (1, 4, "stripe"), (4, 1, "contiguous")):
        mesh = init_mesh(u, r)
        model = sequence_parallel(copy.deepcopy(base), mesh, layout=layout, backend="naive")
        shard = shard_batch(mesh, ids, cu_seqlens=cu, layout=layout)
        logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], use_cache=False,
                       **shard["attention_kwargs"]).logits
        loss = sequence_parallel_loss(logits, shard["shift_labels"], mesh)
        loss.backward()
        all_reduce_gradients(model, mesh)
        results[f"u{u}r{r}-{layout}"] = dict(
            loss=abs(loss.item() - expected.item()) / expected.item(),
            gradients=max(((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
                          for p, q in zip(model.parameters(), reference.parameters())))
    return results


def test_packed_documents_train_as_each_document_alone(four_ranks):
    for rank, results in enumerate(four_ranks[3]):
        for name, differences in results.items():
            assert differences["loss"] <= 1e-10 and differences["gradients"] <= 1e-10, (rank, name, differences)


@pytest.mark.parametrize("options, message", [
    (dict(attention_mask=torch.ones(1, 1, 4, 4)), "a 4-D attention mask"),
    (dict(dropout=0.1), "attention dropout 0.1"),
    (dict(sliding_window=6), "a sliding window of 6 tokens over a 8-token sequence"),
    (dict(softcap=30.0), "a logit softcap (30.0)"),
    (dict(key_length=6), "a key/value cache (call the model with use_cache=False"),
    (dict(s_aux=torch.zeros(4)), "the inputs s_aux (attention sinks, ...)"),
])
def test_the_attention_refuses_what_it_cannot_honour(options, message):
    """Raised before any communication, so one process and a stand-in mesh (2 ranks) do."""
    from usp.attention.hf import _attention

    options = dict(options)
    key = torch.zeros(1, 2, options.pop("key_length", 4), 8)
    settings = (types.SimpleNamespace(sp_degree=2), "zigzag", None, True)
    with pytest.raises(ValueError, match="USP attention in Module does not support") as error:
        _attention(settings, torch.nn.Module(), torch.zeros(1, 4, 4, 8), key, key,
                   options.pop("attention_mask", None), **options)
    assert message in str(error.value)


def test_packed_documents_need_equal_query_and_key_offsets():
    from usp.attention.hf import _attention

    key = torch.zeros(1, 2, 4, 8)
    settings = (types.SimpleNamespace(sp_degree=2), "zigzag", None, True)
    with pytest.raises(ValueError, match="packed documents as equal cu_seq_lens_q and cu_seq_lens_k"):
        _attention(settings, torch.nn.Module(), torch.zeros(1, 4, 4, 8), key, key, None,
                   cu_seq_lens_q=torch.tensor([0, 8]), cu_seq_lens_k=torch.tensor([0, 4, 8]))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp64", "bf16"])
def test_the_train_command_under_torchrun(tmp_path, dtype):
    """The torchrun path (gloo without CUDA): rank 0 trains the reference, every process a
    rank; bf16 is autocast over float32 weights and has no bar, only its difference."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "usp.bench", "train", "--mesh", "2x1", "1x2", "--layout", "zigzag",
                           "--steps", "3", "--seqlen", "32", "--dtype", dtype, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("train-*.json")
    document = json.loads(path.read_text())
    assert document["config"]["process_group"] == "gloo" and document["config"]["world_size"] == 2
    assert [r["name"] for r in document["records"]] == ["u2r1", "u1r2-zigzag"]
    for record in document["records"]:
        assert record["mfu"] is None and all(t > 0 for t in record["model_tflops_per_process"])
        if dtype == "fp64":
            assert record["parity"] is True and record["max_relative_difference"] <= 1e-10
        else:  # bf16 rounding: a difference, but a small one
            assert record["parity"] is None and 0 < record["max_relative_difference"] < 1e-2


def _compiled_against_eager() -> dict:
    """A LLaMA on USP (ring of 2 ranks) compiled whole with fullgraph: graph breaks, and
    the largest differences of its loss and gradients from eager (float64)."""
    from usp.attention.hf import sequence_parallel, sequence_parallel_loss, shard_batch
    from usp.comm import init_mesh

    setup = _setup("fp64", steps=1)
    mesh = init_mesh(1, 2)
    model = sequence_parallel(build_model(setup, torch.device("cpu")), mesh)
    shard = shard_batch(mesh, torch.randint(64, (2, 32), generator=torch.Generator().manual_seed(0)))
    inputs = dict(input_ids=shard["input_ids"], position_ids=shard["position_ids"])

    def loss_and_grads(forward):
        model.zero_grad()
        loss = sequence_parallel_loss(forward(**inputs).logits, shard["shift_labels"], mesh)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    explain = torch._dynamo.explain(model)(**inputs)
    eager_loss, eager_grads = loss_and_grads(model)
    loss, grads = loss_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    return dict(graph_breaks=explain.graph_break_count, loss=(loss - eager_loss).abs().item(),
                grads=max((g - e).abs().max().item() for g, e in zip(grads, eager_grads)))


@pytest.mark.slow
def test_a_model_on_usp_compiles_with_fullgraph():
    for result in run(2, _compiled_against_eager, pg_timeout_s=120.0):
        assert result["graph_breaks"] == 0
        assert result["loss"] <= 1e-12 and result["grads"] <= 1e-12
