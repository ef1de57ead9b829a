"""``torch.compile(fullgraph=True)`` of a model whose forward calls the sequence-parallel
attention: no graph break (``torch._dynamo.explain``), and the compiled model's loss and
gradients equal the eager ones. Float64 with the naive backend, so "equal" means equal
to 1e-12 (the same operations in the same order; the tolerance only allows for a
compiler that fuses the surrounding arithmetic differently). Every CPU test here is in the
slow step (about 8 s each on 2 cores, the default suite's budget is spent elsewhere):
``aot_eager`` (tracing, fake tensors and AOT autograd through the custom ops, no code
generation) on 1 and 4 ranks, ``opcheck``, and the default inductor backend on 2."""

import pytest
import torch
import torch.distributed as dist

from usp.attention import USPAttention, ring_attention, shard_sequence, ulysses_attention, usp_attention
from usp.bench.launch import run
from usp.comm import init_mesh

TOLERANCE = 1e-12


def _models(mesh, backend="naive"):
    """Small models around each public call: a projection before and a loss after."""
    module = USPAttention(mesh, causal=True, backend=backend)
    calls = {
        "USPAttention": lambda q, k, v: module(q, k, v),
        "usp_attention": lambda q, k, v: usp_attention(q, k, v, mesh, causal=True, backend=backend),
        "ring_attention": lambda q, k, v: ring_attention(q, k, v, mesh.ring_group, causal=True, backend=backend),
        "ulysses_attention": lambda q, k, v: ulysses_attention(q, k, v, mesh.ulysses_group, backend=backend),
        "ulysses_attention documents": lambda q, k, v: ulysses_attention(
            q, k, v, mesh.ulysses_group, True, backend=backend, window_size=(5, 0),
            cu_seqlens=(0, 6, q.shape[1] * mesh.ulysses_degree)),  # a tuple: nothing to read from a tensor
        "usp_attention allgather documents": lambda q, k, v: usp_attention(
            q, k, v, mesh, True, backend=backend, window_size=(5, 0), schedule="allgather",
            cu_seqlens=(0, 8, q.shape[1] * mesh.sp_degree)),
    }
    return {name: (lambda q, k, v, call=call: call(q * 1.5, k, v.tanh()).square().sum()) for name, call in
            calls.items()}


def _compare(model, inputs, backend: str) -> dict:
    """Graph breaks, and the largest difference of the loss and each gradient, compiled against eager."""
    explained = torch._dynamo.explain(model)(*inputs)
    custom_op = any("sp_attention_forward" in str(graph.graph) for graph in explained.graphs)
    results = []
    for run_model in (model, torch.compile(model, fullgraph=True, backend=backend)):
        leaves = [x.detach().requires_grad_() for x in inputs]
        loss = run_model(*leaves)
        loss.backward()
        results.append([loss.detach(), *(x.grad for x in leaves)])
    return dict(breaks=explained.graph_break_count, custom_op=custom_op,
                difference=max((a - b).abs().max().item() for a, b in zip(*results)),
                relative=max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(*results)))


def _sharded_inputs(mesh, seqlen: int, head_dim: int, dtype: torch.dtype, device: str = "cpu") -> list:
    """This rank's shards of seeded q (4 heads), k and v (2 heads each)."""
    generator = torch.Generator(device=device).manual_seed(0)
    return [shard_sequence(torch.randn(1, seqlen, heads, head_dim, dtype=dtype, device=device, generator=generator),
                           mesh) for heads in (4, 2, 2)]


def _compiled_against_eager(ulysses_degree: int, ring_degree: int, backend: str) -> dict:
    mesh = init_mesh(ulysses_degree, ring_degree)
    inputs = _sharded_inputs(mesh, 32, 8, torch.float64)
    seen = {name: _compare(model, inputs, backend) for name, model in _models(mesh).items()}
    # the checks run inside the compiled call, at run time: rank 1 passing another length, a NaN on rank 0
    torch._dynamo.reset()
    checked = torch.compile(lambda q, k, v, **kw: usp_attention(q, k, v, mesh, causal=True, backend="naive", **kw),
                            fullgraph=True, backend=backend)
    odd = inputs[0][:, :-2] if dist.get_rank() == 1 else inputs[0]
    poisoned = inputs[1].clone()
    if dist.get_rank() == 0:
        poisoned[0, 0, 0, 0] = float("nan")
    for name, arguments, options in (("disagree", (odd, odd, odd), {}),
                                     ("nan", (inputs[0], poisoned, inputs[2]), dict(check_finite=True))):
        try:
            checked(*arguments, **options)
            seen[name] = "no error"
        except Exception as error:  # noqa: BLE001 - what a user would see, whatever the compiler wraps it in
            seen[name] = f"{type(error).__name__}: {error}"
    return seen


def _compiled_with_triton(device: str, backend: str, names: tuple[str, ...]) -> dict:
    """The models ``names`` on the triton backend, float32 (exact float32 products) on ``device``."""
    mesh = init_mesh(1, dist.get_world_size())
    inputs = _sharded_inputs(mesh, 256, 64, torch.float32, device)
    return {name: _compare(model, inputs, backend) for name, model in _models(mesh, "triton").items()
            if name in names}


def _opchecks() -> dict:
    """``torch.library.opcheck`` of the forward op (schema, autograd registration, the fake
    implementation against the real one, AOT dispatch with dynamic shapes, which runs the
    backward op too) on 4 ranks: USP with GQA, uneven Ulysses heads, ring (the all-gather
    schedule), MQA, and one rank alone (dp = 4; the naive kernel's output is a transposed
    view, the op's must not be)."""
    results = {}
    for u, r, heads, kv_heads in ((2, 2, 4, 2), (4, 1, 6, 2), (1, 4, 4, 4), (4, 1, 4, 1), (1, 1, 4, 2)):
        mesh = init_mesh(u, r)
        generator = torch.Generator().manual_seed(0)
        q, k, v = (shard_sequence(torch.randn(1, 32, h, 8, dtype=torch.float64, generator=generator),
                                  mesh).requires_grad_() for h in (heads, kv_heads, kv_heads))
        arguments = (q, k, v, mesh.ulysses_group.group_name, mesh.ring_group.group_name, True, 0.35, "zigzag",
                     "naive", [], [-1, -1], "allgather" if r == 4 else "ring", mesh.sp_group.group_name,
                     "usp_attention", True, False)
        results[f"u{u}r{r} h{heads}/{kv_heads}"] = torch.library.opcheck(torch.ops.usp.sp_attention_forward.default,
                                                                         arguments)
    return results


@pytest.mark.slow
def test_the_custom_op_passes_opcheck():
    for checks in run(4, _opchecks, pg_timeout_s=120)[0].values():
        assert set(checks.values()) == {"SUCCESS"}, checks


@pytest.mark.slow
@pytest.mark.parametrize("world, mesh", [(1, (1, 1)), (4, (2, 2))])
def test_compiled_attention_has_no_graph_break_and_equals_eager(world, mesh):
    for rank, seen in enumerate(run(world, _compiled_against_eager, (*mesh, "aot_eager"), pg_timeout_s=120)):
        for name in ("USPAttention", "usp_attention", "ring_attention", "ulysses_attention",
                     "ulysses_attention documents", "usp_attention allgather documents"):
            assert seen[name]["breaks"] == 0 and seen[name]["custom_op"], (rank, name)  # one graph, the op in it
            assert seen[name]["difference"] <= TOLERANCE, (rank, name, seen[name])
        if world > 1:
            assert "the ranks of the group disagree on usp_attention (q_shape, k_shape, v_shape)" in seen["disagree"]
            assert "non-finite inputs to usp_attention (check_finite): rank 0: k (1 NaN)" in seen["nan"]


@pytest.mark.slow
def test_inductor_compiles_it_too():
    for rank, seen in enumerate(run(2, _compiled_against_eager, (1, 2, "inductor"), pg_timeout_s=600)):
        for name in ("USPAttention", "usp_attention", "ring_attention", "ulysses_attention",
                     "ulysses_attention documents", "usp_attention allgather documents"):
            assert seen[name]["breaks"] == 0 and seen[name]["difference"] <= TOLERANCE, (rank, name, seen[name])


@pytest.mark.gpu
def test_inductor_compiles_the_triton_kernels_on_nccl():
    """On one GPU (NCCL): the module, and the function with documents, a window and the
    all-gather schedule, compile with no graph break, the custom op in the graph, and
    equal eager within float32 rounding of the arithmetic that inductor fuses around the
    call (the loss and each gradient within 1e-5 of its own largest value)."""
    names = ("USPAttention", "usp_attention allgather documents")
    (seen,) = run(1, _compiled_with_triton, ("cuda", "inductor", names), backend="nccl", pg_timeout_s=600)
    assert set(seen) == set(names)
    for name, result in seen.items():
        assert result["breaks"] == 0 and result["custom_op"], (name, result)
        assert result["relative"] <= 1e-5, (name, result)
