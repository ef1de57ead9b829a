"""Exactness of the communication layer on gloo processes: the mesh's groups, the
Ulysses all-to-alls (and their backward), and sharding/gathering a sequence. Inputs
encode their own global coordinates, so any misplaced element shows."""

import datetime
import functools

import pytest
import torch
import torch.distributed as dist

from usp.attention import (LAYOUTS, LongContextAttention, USPAttention, gather_sequence, naive_attention,
                           ring_attention, sequence_positions, shard_sequence, ulysses_attention, usp_attention)
from usp.bench.launch import run
from usp.attention.ring import ring_backward, ring_forward
from usp.comm import RingComm, head_to_seq, init_mesh, record_traffic, replicate_kv_heads, seq_to_head
from usp.comm import agreement, mesh as mesh_module
from usp.comm.agreement import cpu_capable, host_group, post_agreement
from usp.comm.ring import Delivered
from usp.comm.heads import head_shares
from usp.comm.mesh import group_timeout
from usp.kernels import get_backend

B, D = 2, 3
_SHORT = datetime.timedelta(seconds=30)


def _encoded(seqlen: int, heads: int) -> torch.Tensor:
    """x[b, s, h, d] = 10000 b + 100 s + 10 h + d: every element names its place."""
    b, s, h, d = torch.meshgrid(torch.arange(B), torch.arange(seqlen), torch.arange(heads), torch.arange(D),
                                indexing="ij")
    return (10000 * b + 100 * s + 10 * h + d).double()


def _check_all_to_all(ulysses_degree: int, ring_degree: int, placement: str):
    mesh = init_mesh(ulysses_degree, ring_degree, placement)
    group, u, j = mesh.ulysses_group, mesh.ulysses_degree, mesh.ulysses_rank
    seqlen = 4 * u
    for heads in (2 * u, 2 * u + 1):  # even shares, then rank 0 holding one head more: 3, 2, 2, ...
        first = 2 * j + (heads % u and j > 0)
        mine = slice(first, first + 2 + (heads % u and j == 0))  # this rank's heads
        whole = _encoded(seqlen, heads)
        piece = whole.chunk(u, dim=1)[j].clone().requires_grad_()
        head_sharded = seq_to_head(piece, group)
        assert torch.equal(head_sharded, whole[:, :, mine]), (heads, j)
        assert torch.equal(head_to_seq(head_sharded, group, head_shares(heads, u)), piece)
        # backward of seq_to_head is head_to_seq: a head-sharded gradient comes back to the sequence piece
        grad_whole = -_encoded(seqlen, heads)
        head_sharded.backward(grad_whole[:, :, mine])
        assert torch.equal(piece.grad, grad_whole.chunk(u, dim=1)[j])
    # one K/V head for u ranks: replicated, each rank gets the copy its query heads use, grads summed
    kv_piece = _encoded(seqlen, 1).chunk(u, dim=1)[j].clone().requires_grad_()
    kv_sharded = seq_to_head(replicate_kv_heads(kv_piece, 2 * u, u), group)
    assert torch.equal(kv_sharded, _encoded(seqlen, 1))
    kv_sharded.backward(torch.ones_like(kv_sharded))
    assert torch.equal(kv_piece.grad, torch.full_like(kv_piece, float(u)))
    return "ok"


def _check_shard_gather(world_meshes):
    for u, r, placement in world_meshes:
        mesh = init_mesh(u, r, placement)
        for layout in LAYOUTS:
            seqlen = 2 * u * r * 3
            whole = _encoded(seqlen, 2)
            local = shard_sequence(whole, mesh, layout=layout)
            positions = sequence_positions(seqlen, mesh, layout)
            assert torch.equal(local[0, :, 0, 0], 100 * positions.double()), (u, r, placement, layout)
            assert torch.equal(gather_sequence(local, mesh, layout=layout), whole)
            # any dim: the sequence on dim 0 of a [S, B] tensor
            flat = whole[:, :, 0, 0].t().contiguous()
            assert torch.equal(gather_sequence(shard_sequence(flat, mesh, dim=0, layout=layout), mesh, dim=0,
                                               layout=layout), flat)
    return "ok"


def _check_all_to_alls():
    return [_check_all_to_all(4, 1, "ulysses_inner"), _check_all_to_all(2, 2, "ring_inner")]


def test_all_to_all_is_exact_and_its_backward_inverse():
    assert run(4, _check_all_to_alls, pg_timeout_s=60) == [["ok", "ok"]] * 4


def _check_ring_hops():
    """Both transports over the world ring (4) and a mesh's rings (2): each rank gets its
    previous rank's tensors, two dtypes in flight side by side as in backward; and a
    whole causal zigzag ring forward and backward over each transport."""
    mesh = init_mesh(2, 2)
    for group in (None, mesh.ring_group):
        for by_all_to_all in (True, False):
            ring = RingComm(group, by_all_to_all)
            mine = [_encoded(4, 2) + 1e6 * ring.rank, _encoded(2, 3).float() - ring.rank]
            first = ring.send_recv(mine, "kv-forward", 1)
            second = ring.send_recv([x * 2 for x in mine], "dkv-backward", 1)
            previous = (ring.rank - 1) % ring.size
            expected = [_encoded(4, 2) + 1e6 * previous, _encoded(2, 3).float() - previous]
            assert all(torch.equal(a, b) for a, b in zip(first.wait(), expected))
            assert all(torch.equal(a, 2 * b) for a, b in zip(second.wait(), expected))
    world = RingComm(None)
    generator = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 32, 2, 8, generator=generator, dtype=torch.float64) for _ in range(4))
    oracle = torch.func.vjp(lambda *x: naive_attention(*x, True)[0], q, k, v)
    expected = (oracle[0], *oracle[1](dout))
    positions = sequence_positions(32, init_mesh(1, 4), "zigzag")
    shards = [x[:, positions] for x in (q, k, v, dout)]
    backend, scale = get_backend("torch"), 8 ** -0.5
    for by_all_to_all in (True, False):
        ring = RingComm(None, by_all_to_all)
        out, lse = ring_forward(*shards[:3], ring, True, scale, "zigzag", backend)
        grads = ring_backward(shards[3], *shards[:3], out, lse, ring, True, scale, "zigzag", backend)
        for got, want in zip((out, *grads), expected):  # float64 throughout: rounding only
            torch.testing.assert_close(got, want[:, positions], rtol=0, atol=1e-12)
    assert world.by_all_to_all  # gloo's default
    return "ok"


def test_ring_hops_are_exact_by_all_to_all_and_point_to_point():
    assert run(4, _check_ring_hops, pg_timeout_s=60) == ["ok"] * 4


def _check_post_after_agreement():
    """``when_agreed``: the transfer is posted once, and only when every rank agreed; the
    transfer's wait raises the disagreement on every rank, with nothing posted."""
    posted = []

    def post():
        posted.append(1)
        return Delivered(["sent"])

    seen = []
    for fields in ({"shape": (2, 3)}, {"shape": (2, 3 + (dist.get_rank() == 2))}):
        agreement = post_agreement(dist.group.WORLD, "a call", fields, torch.device("cpu"))
        transfer = agreement.when_agreed(post)
        try:
            seen.append(transfer.wait())
        except ValueError as error:
            seen.append(str(error))
    return seen, len(posted)


def _check_on_host_twins():
    """A mesh built as on NCCL (gloo twins beside its groups, forced here on gloo): the
    calls' checks all-gather over the twins, never over the groups that move the data,
    and a disagreement still raises on every rank."""
    needs_twins, all_gather = mesh_module._needs_host_twins, dist.all_gather
    exchanged_on = []

    def spy(table, tensor, group=None, async_op=False):
        exchanged_on.append(group.group_name)
        return all_gather(table, tensor, group=group, async_op=async_op)

    mesh_module._needs_host_twins = lambda backend: True
    try:
        mesh = init_mesh(2, 2)
        twins = {name: host_group(getattr(mesh, name)) for name in ("ulysses_group", "ring_group", "sp_group")}
        plain = init_mesh(2, 2, check_on_host=False)  # no twins: the checks exchange over the groups themselves
        untwinned = all(host_group(getattr(plain, name)) is getattr(plain, name) for name in twins)
        agreement.dist.all_gather = spy
        q, k, v = (torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        usp_attention(q, k, v, mesh, causal=True, backend="naive").sum().backward()
        try:
            short = 3 if dist.get_rank() == 2 else 4
            usp_attention(q[:, :short], k[:, :short], v[:, :short], mesh, backend="naive")
            error = ""
        except ValueError as raised:
            error = str(raised)
    finally:
        mesh_module._needs_host_twins, agreement.dist.all_gather = needs_twins, all_gather
    return dict(same_ranks=all(dist.get_process_group_ranks(twin) == dist.get_process_group_ranks(getattr(mesh, n))
                               and twin is not getattr(mesh, n) for n, twin in twins.items()),
                exchanged_on=set(exchanged_on), sp_twin=twins["sp_group"].group_name,
                data_groups={getattr(mesh, n).group_name for n in twins}, error=error, untwinned=untwinned)


def _agreement_checks():
    return _check_post_after_agreement(), _check_on_host_twins()


@functools.cache
def _agreement_results():
    """One launch of 4 ranks for the two checks of the agreement below."""
    return run(4, _agreement_checks, pg_timeout_s=60)


def test_checks_run_on_the_host_beside_groups_without_cpu_tensors():
    assert cpu_capable("gloo") and cpu_capable("cpu:gloo,cuda:nccl") and not cpu_capable("nccl")
    for _, twins in _agreement_results():
        assert twins["same_ranks"] and twins["untwinned"]
        assert twins["exchanged_on"] == {twins["sp_twin"]} and not twins["exchanged_on"] & twins["data_groups"]
        assert twins["error"].startswith("the ranks of the group disagree on usp_attention (q_shape, k_shape, "
                                         "v_shape): rank 0: q_shape=(1, 4, 4, 8)"), twins["error"]


def test_a_transfer_waits_for_the_ranks_to_agree():
    for (seen, posted), _ in _agreement_results():
        assert seen[0] == ["sent"] and posted == 1  # agreed: posted once; disagreed: never
        assert seen[1].startswith("the ranks of the group disagree on a call (shape): rank 0: shape=(2, 3); "
                                  "rank 1: shape=(2, 3); rank 2: shape=(2, 4)")


def _mesh_groups(placement):
    mesh = init_mesh(2, 2, placement)
    on_sub = init_mesh(2, 1, group=[2, 1])
    sub = dist.new_group([1, 2])
    member = dist.get_rank() in (1, 2)
    try:  # the placeholder a non-member holds names no ranks: every rank hears of it, nothing hangs
        init_mesh(2, 1, group=sub)
        raise AssertionError("a non-member's placeholder group was accepted")
    except ValueError as error:
        assert "disagree on init_mesh (group)" in str(error) and "pass the list of ranks instead" in str(error)
    sub_mesh = init_mesh(2, 1, group=sub if member else [1, 2], timeout=_SHORT)  # the group itself, or its ranks
    if member:
        assert dist.get_process_group_ranks(sub_mesh.ulysses_group) == [1, 2]
    else:
        assert sub_mesh is None
    other = init_mesh(1, 4, "ring_inner")  # a second mesh over the same ranks
    return dict(
        coords=(mesh.dp_rank, mesh.ulysses_rank, mesh.ring_rank),
        ulysses=dist.get_process_group_ranks(mesh.ulysses_group), ring=dist.get_process_group_ranks(mesh.ring_group),
        sp=dist.get_process_group_ranks(mesh.sp_group), dp=dist.get_process_group_ranks(mesh.dp_group),
        on_sub=None if on_sub is None else dist.get_process_group_ranks(on_sub.ulysses_group),
        other_ring=dist.get_process_group_ranks(other.ring_group),
        timeouts={group_timeout(g).total_seconds() for g in (mesh.ulysses_group, mesh.ring_group, mesh.sp_group)})


def _eight_ranks():
    shard_gather = _check_shard_gather([(2, 2, "ulysses_inner"), (2, 4, "ring_inner"), (4, 2, "ulysses_inner"),
                                        (1, 8, "ulysses_inner"), (8, 1, "ring_inner")])
    return dict(shard_gather=shard_gather, inner=_mesh_groups("ulysses_inner"), outer=_mesh_groups("ring_inner"))


@functools.cache
def _eight_rank_results():
    """One launch of 8 ranks serves the tests below (about 10 s on 2 cores: the slow step,
    as the other 8-rank launches)."""
    return run(8, _eight_ranks, pg_timeout_s=61)


@pytest.mark.slow
def test_shard_and_gather_are_exact():
    assert [r["shard_gather"] for r in _eight_rank_results()] == ["ok"] * 8


@pytest.mark.slow
def test_mesh_groups_follow_the_placement():
    inner = [r["inner"] for r in _eight_rank_results()]
    outer = [r["outer"] for r in _eight_rank_results()]
    # world 8 = dp 2 x ulysses 2 x ring 2. ulysses_inner: Ulysses pairs are neighbours.
    assert [r["ulysses"] for r in inner] == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]
    assert [r["ring"] for r in inner] == [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    assert [r["coords"] for r in inner][5] == (1, 1, 0)
    # ring_inner: the other way round.
    assert [r["ring"] for r in outer] == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]
    assert [r["ulysses"] for r in outer] == [[0, 2], [1, 3], [0, 2], [1, 3], [4, 6], [5, 7], [4, 6], [5, 7]]
    assert [r["coords"] for r in outer][5] == (1, 0, 1)
    for results in (inner, outer):
        assert [r["sp"] for r in results] == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4
        assert [r["dp"] for r in results] == [[0, 4], [1, 5], [2, 6], [3, 7]] * 2
        assert [r["on_sub"] for r in results] == [None, [1, 2], [1, 2], None, None, None, None, None]
        assert [r["other_ring"] for r in results] == [[0, 1, 2, 3]] * 4 + [[4, 5, 6, 7]] * 4
        assert all(r["timeouts"] == {61.0} for r in results)  # the groups inherit the world's timeout


def _module_and_options():
    mesh = init_mesh(2, 2)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 4, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    q, k, v = (shard_sequence(x, mesh) for x in (q, k, v))
    module = USPAttention(mesh, causal=True, backend="naive")
    with record_traffic() as checked:
        from_module = module(q, k, v)
    with record_traffic() as unchecked:
        from_function = usp_attention(q, k, v, mesh, causal=True, backend="naive", check_ranks=False)
    assert torch.equal(from_module, from_function)
    # A head dim that is not unit-stride ([B, S, D, H] memory) reaches the torch backend through a pure ring.
    ring = init_mesh(1, 4)
    q, k, v = (shard_sequence(torch.randn(1, 16, 4, 8, generator=generator, dtype=torch.float64), ring)
               for _ in range(3))
    views = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in (q, k, v)]
    # float64, the same values through the same kernels: a few units of rounding at most
    torch.testing.assert_close(usp_attention(*views, ring, causal=True, backend="torch"),
                               usp_attention(q, k, v, ring, causal=True, backend="torch"), rtol=0, atol=1e-12)
    # Non-causal ring attention with more keys than queries (cross attention), contiguous layout.
    q_all = torch.randn(2, 8 * 4, 2, 8, generator=generator, dtype=torch.float64)
    kv_all = torch.randn(2, 12 * 4, 1, 8, generator=generator, dtype=torch.float64)
    out = ring_attention(shard_sequence(q_all, ring, layout="contiguous"),
                         *(shard_sequence(kv_all, ring, layout="contiguous") for _ in range(2)), ring.ring_group,
                         layout="contiguous", backend="naive")
    expected, _ = naive_attention(q_all, kv_all, kv_all)  # float64: ring and Ulysses agree to ~1e-15 (merge rounding)
    torch.testing.assert_close(gather_sequence(out, ring, layout="contiguous"), expected, rtol=0, atol=1e-14)
    # The same through Ulysses (pieces in Ulysses-rank order), with 2 K/V heads for 2 ranks.
    kv_all = kv_all.expand(-1, -1, 2, -1)
    j = mesh.ulysses_rank
    out = ulysses_attention(q_all.chunk(2, dim=1)[j], *(kv_all.chunk(2, dim=1)[j] for _ in range(2)),
                            mesh.ulysses_group, backend="naive")
    torch.testing.assert_close(out, expected.chunk(2, dim=1)[j], rtol=0, atol=1e-14)
    # yunchang's module signature: the same numbers as usp_attention with the matching layout
    whole = torch.randn(1, 16, 4, 8, generator=generator, dtype=torch.float64)
    for ring_impl_type, layout in (("basic", "contiguous"), ("zigzag", "zigzag"), ("strip", "stripe")):
        local = shard_sequence(whole, mesh, layout=layout)
        compatible = LongContextAttention(mesh, ring_impl_type, backend="naive")
        assert torch.equal(compatible(local, local, local, 0.0, None, True, (-1, -1), 0.0, None, False, False),
                           usp_attention(local, local, local, mesh, True, None, layout, "naive"))
    # a window reaches the ring (here a stripe ring) through the module as through the function
    assert torch.equal(compatible(local, local, local, causal=True, window_size=(5, 0)),
                       usp_attention(local, local, local, mesh, True, None, "stripe", "naive", window_size=(5, 0)))
    errors = [_error_of(lambda: LongContextAttention(mesh, "striped"))]
    return dict(repr=repr(module), checks=(len(checked.of_kind("check")), len(unchecked.of_kind("check"))),
                errors=errors)


def _error_of(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def test_module_options_and_cross_attention():
    result = run(4, _module_and_options, pg_timeout_s=60)[0]
    assert "ulysses_degree=2, ring_degree=2, placement=ulysses_inner, causal=True, layout=zigzag" in result["repr"]
    assert result["checks"] == (1, 0)  # one agreement check per call, none with check_ranks=False
    assert result["errors"] == ["ring_impl_type must be one of ['basic', 'strip', 'zigzag'], got 'striped'"]
