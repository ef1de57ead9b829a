"""The sequence-parallel device mesh: ``world = dp x ulysses x ring`` ranks.

With ``placement="ulysses_inner"`` (the default) a Ulysses group is ``ulysses_degree``
consecutive ranks, so its all-to-alls stay on the fast links inside a node, and a ring
group is strided across nodes, where its point-to-point transfers overlap compute.
``"ring_inner"`` swaps the two. The data-parallel index is outermost. A ``Mesh`` is a
plain value holding its groups: any number of meshes can coexist in one program.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .agreement import cpu_capable, device_of, ensure_ranks_agree, register_host_group
from .heads import heads_problem

PLACEMENTS = ("ulysses_inner", "ring_inner")


def check_group(group, name: str = "group") -> dist.ProcessGroup:
    """``group`` itself when it is a process group, the world for None; a TypeError that
    says what was expected for anything else (a Mesh, a list of ranks, a string)."""
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    hint = (" (pick one of its groups, such as mesh.ring_group)" if isinstance(group, Mesh) else
            " (the placeholder new_group gives a rank outside the group)" if _is_placeholder(group) else "")
    raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None (the world), got "
                    f"{type(group).__name__}{hint}")


def check_mesh(mesh) -> Mesh:
    """``mesh`` when it is a ``Mesh``; a TypeError that says what was expected otherwise."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a usp.comm.Mesh (see usp.comm.init_mesh), got {type(mesh).__name__}")
    return mesh


def _is_placeholder(group) -> bool:
    """What ``new_group`` returns to a rank that is not in the group."""
    return not isinstance(group, bool) and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER


def mesh_shapes(world_size: int, heads: int | None = None, kv_heads: int | None = None) -> list[tuple[int, int]]:
    """Every ``(ulysses_degree, ring_degree)`` with ``u x r = world_size``, by increasing ``u``
    (``(1, N)`` is pure ring, ``(N, 1)`` pure Ulysses, the others USP); given the heads,
    only those whose Ulysses degree can split them (``usp.comm.heads``)."""
    shapes = [(u, world_size // u) for u in range(1, world_size + 1) if world_size % u == 0]
    if heads is None:
        return shapes
    return [(u, r) for u, r in shapes if heads_problem(heads, kv_heads or heads, u) is None]


@dataclass(frozen=True)
class Mesh:
    """This rank's view of a ``dp x ulysses x ring`` mesh.

    ``ulysses_group`` / ``ring_group`` hold this rank's Ulysses and ring peers, ordered
    by their coordinate (group rank == ``ulysses_rank`` / ``ring_rank``); ``sp_group``
    is the ``ulysses x ring`` ranks sharing one sequence, ``dp_group`` the replicas of
    this rank's position (for data-parallel gradient reduction).
    """

    ulysses_degree: int
    ring_degree: int
    dp_degree: int
    placement: str
    rank: int  # position in the mesh (0 .. world_size - 1)
    ranks: tuple[int, ...]  # global rank of every mesh position
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    sp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def coordinates(self, position: int | None = None) -> tuple[int, int, int]:
        """``(dp_rank, ulysses_rank, ring_rank)`` of a mesh position (default: this rank)."""
        return mesh_coordinates(self.rank if position is None else position, self.ulysses_degree,
                                self.ring_degree, self.placement)

    @property
    def dp_rank(self) -> int:
        return self.coordinates()[0]

    @property
    def ulysses_rank(self) -> int:
        return self.coordinates()[1]

    @property
    def ring_rank(self) -> int:
        return self.coordinates()[2]


def mesh_coordinates(position: int, ulysses_degree: int, ring_degree: int, placement: str) -> tuple[int, int, int]:
    """``(dp, ulysses, ring)`` coordinates of a mesh position for a placement."""
    sp = ulysses_degree * ring_degree
    dp, local = divmod(position, sp)
    if placement == "ulysses_inner":
        ring, ulysses = divmod(local, ulysses_degree)
    else:
        ulysses, ring = divmod(local, ring_degree)
    return dp, ulysses, ring


def mesh_position(dp: int, ulysses: int, ring: int, ulysses_degree: int, ring_degree: int, placement: str) -> int:
    """The inverse of ``mesh_coordinates``."""
    local = ring * ulysses_degree + ulysses if placement == "ulysses_inner" else ulysses * ring_degree + ring
    return dp * ulysses_degree * ring_degree + local


def group_timeout(group: dist.ProcessGroup | None) -> datetime.timedelta | None:
    """The timeout a process group was created with, when torch exposes it."""
    group = group or dist.group.WORLD
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            return group._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def _check_degree(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _mesh_ranks(group) -> tuple[tuple[int, ...] | None, str]:
    """The global ranks a mesh is built over (the world, a group this rank is in, or a
    list), or None and why not. Never raises: the ranks first agree on what they got."""
    world = dist.get_world_size()
    if group is None:
        return tuple(range(world)), ""
    if isinstance(group, dist.ProcessGroup):
        return tuple(sorted(dist.get_process_group_ranks(group))), ""
    if _is_placeholder(group):
        return None, ("group is the placeholder new_group gives a rank outside the group, which names no ranks: "
                      "pass the list of ranks instead")
    if isinstance(group, (list, tuple, range)) and all(isinstance(r, int) and not isinstance(r, bool) for r in group):
        ranks = tuple(sorted(group))
        if not ranks or len(set(ranks)) != len(ranks) or not 0 <= ranks[0] <= ranks[-1] < world:
            return None, f"group must list distinct ranks of the world (0 .. {world - 1}), got {list(group)}"
        return ranks, ""
    return None, (f"group must be None, a process group this rank belongs to, or a list of global ranks, got "
                  f"{type(group).__name__}")


def _needs_host_twins(backend: str) -> bool:
    """Whether the mesh's groups need gloo twins for their checks (their backend takes no CPU tensors)."""
    return not cpu_capable(backend)


def init_mesh(ulysses_degree: int, ring_degree: int, placement: str = "ulysses_inner",
              group: dist.ProcessGroup | list[int] | None = None,
              timeout: datetime.timedelta | None = None, check_on_host: bool = True) -> Mesh | None:
    """Split the ranks of ``group`` (default: the world; a process group or a list of
    global ranks) into Ulysses, ring, sequence and data-parallel groups.
    ``dp = size(group) / (ulysses_degree x ring_degree)``.

    Like ``torch.distributed.new_group``, every rank of the default process group must
    call this, with the same arguments, in the same order as its other group creations;
    a rank outside ``group`` gets ``None`` (such a rank cannot read a group's ranks from
    the placeholder ``new_group`` gave it: pass the list). Ranks that ask for different
    meshes all raise the same ValueError, naming what each asked for (one small
    all-gather over the world first). The new groups inherit the timeout of ``group``
    (or of the world) unless ``timeout`` is given, so a rank that fails makes its peers
    fail within it. On NCCL, call ``torch.cuda.set_device`` first: this first check runs
    on the current GPU. With ``check_on_host``, a backend without CPU tensors (NCCL) also
    gets a gloo group over the same ranks beside each group the calls check on, where
    their rank checks run on the host, so checking never synchronises with the GPU
    (``usp.comm.agreement.host_group``; gloo then needs the network too: set
    ``GLOO_SOCKET_IFNAME`` where it picks the wrong interface). Without it, the checks
    exchange on the GPU (a host synchronisation per checked call)."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
    ranks, group_problem = _mesh_ranks(group)
    # Every rank creates the same groups in the same order, or torch's group creation hangs
    # until the store's timeout: first make sure they all asked for the same mesh.
    ensure_ranks_agree(dist.group.WORLD, "init_mesh", dict(
        ulysses_degree=ulysses_degree, ring_degree=ring_degree, placement=placement, check_on_host=check_on_host,
        group=ranks if ranks is not None else group_problem), device_of(None))
    if ranks is None:
        raise ValueError(group_problem)
    ulysses_degree = _check_degree("ulysses_degree", ulysses_degree)
    ring_degree = _check_degree("ring_degree", ring_degree)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    sp = ulysses_degree * ring_degree
    if len(ranks) % sp:
        raise ValueError(f"ulysses_degree x ring_degree = {ulysses_degree} x {ring_degree} = {sp} must divide "
                         f"the number of ranks ({len(ranks)})")
    dp_degree = len(ranks) // sp
    timeout = timeout or group_timeout(group if isinstance(group, dist.ProcessGroup) else None)
    me = dist.get_rank()
    host_twins = bool(check_on_host) and _needs_host_twins(dist.get_backend())

    def coords(position):
        return mesh_coordinates(position, ulysses_degree, ring_degree, placement)

    def make_groups(key, checked=True):
        """One group per value of ``key(coords)``, created in the same order on every rank
        (and, for a group the calls check on, its gloo twin where ``host_twins``)."""
        members: dict = {}
        for position in range(len(ranks)):
            members.setdefault(key(coords(position)), []).append(position)
        mine = None
        for positions in members.values():
            # Positions ascend with the varying coordinate, so group rank == coordinate.
            members_ranks = [ranks[p] for p in positions]
            created = dist.new_group(members_ranks, timeout=timeout)
            # a group of one rank exchanges nothing: no twin
            twin = (dist.new_group(members_ranks, timeout=timeout, backend="gloo")
                    if host_twins and checked and len(members_ranks) > 1 else None)
            if me in members_ranks:
                mine = created
                if twin is not None:
                    register_host_group(created, twin)
        return mine

    ulysses_group = make_groups(lambda c: (c[0], c[2]))
    ring_group = make_groups(lambda c: (c[0], c[1]))
    sp_group = make_groups(lambda c: c[0])
    dp_group = make_groups(lambda c: (c[1], c[2]), checked=False)
    if me not in ranks:
        return None
    return Mesh(ulysses_degree, ring_degree, dp_degree, placement, ranks.index(me), ranks,
                ulysses_group, ring_group, sp_group, dp_group)
