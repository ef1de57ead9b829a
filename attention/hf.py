"""Hugging Face transformers models trained with USP, without changing the model's code.

Four calls, in the order a training step uses them (``pip install "usp-attention[hf]"``)::

    sequence_parallel(model, mesh)                     # once: attention runs as USP over mesh
    shard = shard_batch(mesh, input_ids)               # this rank's tokens, positions, labels
    logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
    loss = sequence_parallel_loss(logits, shard["shift_labels"], mesh)
    loss.backward()
    all_reduce_gradients(model, mesh)                  # now the gradients of the unsharded loss
    optimizer.step()

What each step gets right that is easy to get wrong:

- Attention: registered with transformers' attention interface under its own name (no
  model class is patched); the model's RoPE sees the global positions of the shard.
- Labels: the label of a token is the next token of the *global* sequence, which for a
  shard's last token lives on another rank, so labels are shifted before sharding
  (``shift_labels``, ``-100`` after the last token) and the model must not shift again:
  do not pass ``labels`` to the model.
- Loss: the mean over the valid labels of the whole batch (every rank of the mesh, data
  parallel replicas included), not the mean of per-rank means.
- Gradients: each rank's backward gives its share of every parameter's gradient (the
  attention's backward already sent K/V gradients to the ranks that own them); their sum
  over the sequence- and data-parallel groups is the gradient of the unsharded loss.

- Packed documents: ``shard_batch(mesh, input_ids, cu_seqlens=cu)`` restarts the
  positions at each document, gives no label across a document's end, and returns the
  ``attention_kwargs`` (flash-attn's ``cu_seq_lens_q/k``, ``max_length_q/k``) that the
  model passes through to its attention: ``model(..., **shard["attention_kwargs"])``.

Sequences are whole and unpadded: a padding mask is not supported (transformers drops a
2-D ``attention_mask`` for a custom attention), so ``shard_batch`` refuses one with zeros;
pack documents instead. Training and prefill only: the key/value cache of generation is
refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from usp.comm import Mesh
from usp.comm.agreement import device_of, ranks_agree
from usp.comm.heads import check_heads
from usp.comm.mesh import check_mesh
from usp.kernels import get_backend

from .functions import usp_attention
from .layout import check_global_seqlen, check_layout
from .sequence import document_offsets, positions_in_documents, sequence_positions, shard_sequence

try:
    from transformers import AttentionInterface
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("usp.attention.hf needs transformers: pip install \"usp-attention[hf]\"") from error

IGNORE_INDEX = -100  # the label transformers' losses skip


def _attention(settings: tuple, module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
               is_causal=None, sliding_window=None, softcap=None, **kwargs):
    """transformers' attention-function contract: ``query: [B, Hq, S_local, D]``,
    ``key, value: [B, Hkv, S_local, D]`` -> ``([B, S_local, Hq, D], None)``."""
    mesh, layout, backend, check_ranks = settings
    seqlen = query.shape[2] * mesh.sp_degree  # the global length
    documents = _documents(kwargs)
    extra = sorted(name for name, x in kwargs.items() if isinstance(x, torch.Tensor) and name not in PACKED_KWARGS)
    problem = (
        "a 4-D attention mask (sequences must be whole and unpadded)" if attention_mask is not None else
        f"attention dropout {dropout}" if dropout else
        f"a sliding window of {sliding_window} tokens over a {seqlen}-token sequence"
        if sliding_window is not None and sliding_window < seqlen else
        f"a logit softcap ({softcap})" if softcap else
        "a key/value cache (call the model with use_cache=False: generation is not sequence parallel)"
        if query.shape[2] != key.shape[2] else
        f"the inputs {', '.join(extra)} (attention sinks, ...)" if extra else None)
    if problem:
        raise ValueError(f"USP attention in {type(module).__name__} does not support {problem}")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    device_type = q.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # RoPE gives float32 q, k beside a low-precision v: all to the autocast dtype, as SDPA does
        low = torch.get_autocast_dtype(device_type)
        q, k, v = (x.to(low) if x.dtype == torch.float32 else x for x in (q, k, v))
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        return usp_attention(q, k, v, mesh, causal, scaling, layout, backend, check_ranks=check_ranks,
                             cu_seqlens=documents), None


# flash-attn's keyword arguments for packed documents, which transformers' models pass
# through to the attention function: the global offsets, the same for queries and keys.
PACKED_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")


def _documents(kwargs: dict):
    """The packed documents' offsets the model was called with (``cu_seq_lens_q``), or None."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if (cu_q is None) != (cu_k is None) or (cu_q is not cu_k and cu_q is not None and not torch.equal(cu_q, cu_k)):
        raise ValueError("USP attention takes packed documents as equal cu_seq_lens_q and cu_seq_lens_k (self-"
                         "attention over one packed sequence): pass shard_batch(...)['attention_kwargs']")
    return cu_q


def _check_positions(mesh: Mesh, layout: str, model, args, kwargs) -> None:
    """Before each forward: the model gets the position ids of ``shard_batch`` for the
    layout its attention was set up with (up to an offset per row), or a ValueError."""
    positions = kwargs.get("position_ids")
    if positions is None:
        raise ValueError("a sequence-parallel model needs position_ids=shard['position_ids'] from shard_batch: "
                         "without them its RoPE numbers this rank's tokens from 0")
    if torch.compiler.is_compiling():
        return
    expected = sequence_positions(positions.shape[-1] * mesh.sp_degree, mesh, layout, device=positions.device,
                                  cu_seqlens=_documents(kwargs))
    offset = positions - expected
    if not bool((offset == offset[..., :1]).all()):
        raise ValueError(f"position_ids are not this rank's positions in the {layout} layout the model's attention "
                         f"was set up with: shard the batch with shard_batch(..., layout={layout!r})")


_names = itertools.count()


def _register(mesh: Mesh, layout: str, backend, check_ranks: bool) -> str:
    """A new attention-interface name for one mesh and set of options (a model holds only
    a name, so the options live in the function registered under it)."""
    name = f"usp_u{mesh.ulysses_degree}r{mesh.ring_degree}_{layout}_{next(_names)}"
    AttentionInterface.register(name, functools.partial(_attention, (mesh, layout, backend, check_ranks)))
    return name


def sequence_parallel(model, mesh: Mesh, *, layout: str = "zigzag", backend=None, check_ranks: bool = True):
    """Make every attention layer of ``model`` (a transformers causal LM of the LLaMA
    family: LLaMA, Mistral, Qwen2, ... whose attention goes through transformers' attention
    interface) run ``usp_attention`` over ``mesh`` on this rank's shard. Returns the model.

    Feed it the shards of ``shard_batch`` with the same ``layout``, ``position_ids``
    included: before each forward a hook checks that they are this rank's positions in
    that layout (up to an offset per row). ``backend``, ``check_ranks``: as for
    ``usp_attention``. Raises a ValueError (the same on every rank) when the Ulysses
    degree cannot split the model's heads; the attention raises one for what it cannot
    honour (masks, dropout, a window shorter than the sequence, softcap, a KV cache, any
    extra tensor input such as attention sinks). Packed documents come as flash-attn's
    ``cu_seq_lens_q/k`` keywords of the model call (``shard_batch``'s ``attention_kwargs``)."""
    check_mesh(mesh)
    check_layout(layout)
    config = model.config
    heads = config.num_attention_heads
    check_heads(heads, getattr(config, "num_key_value_heads", None) or heads, mesh.ulysses_degree)
    backend = get_backend(backend) if backend is not None else None
    model.set_attn_implementation(_register(mesh, layout, backend, check_ranks))
    model.register_forward_pre_hook(functools.partial(_check_positions, mesh, layout), with_kwargs=True)
    return model


def _fingerprint(x: torch.Tensor) -> str:
    """Equal on two ranks when their tensors are equal (a hash of the bytes)."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def shard_batch(mesh: Mesh, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                layout: str = "zigzag", ignore_index: int = IGNORE_INDEX, check_ranks: bool = True,
                cu_seqlens: torch.Tensor | None = None) -> dict:
    """This rank's shard of a batch of whole sequences, or of one sequence of packed documents.

    ``input_ids: [B, S]`` (every rank of ``mesh.sp_group`` passes the same batch: shard the
    data loader by ``mesh.dp_rank``); ``labels: [B, S]`` in transformers' convention (the
    token itself; default ``input_ids``); ``position_ids: [B, S]`` (default ``0 .. S-1``).
    ``cu_seqlens``: the offsets of packed documents (int32 ``[documents + 1]``, batch 1):
    positions then restart at each document (the default; ``position_ids`` given must
    do so too, up to an offset), no label crosses a document's end, and the zigzag layout cuts each
    document (lengths multiples of ``2 x ring_degree``: see ``pad_documents``).
    Returns ``input_ids``, ``position_ids`` and ``shift_labels`` (the next token's label,
    ``ignore_index`` after the last token of the sequence or of a document), each
    ``[B, S / (u r)]`` in the order of ``shard_sequence(..., layout=layout)``, and
    ``attention_kwargs`` for the model call (flash-attn's ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` with documents, else none): ``model(input_ids=...,
    position_ids=..., **shard["attention_kwargs"])``. ``check_ranks``: first make sure
    every rank of the sequence-parallel group holds the same batch (one small all-gather;
    otherwise a ValueError on every rank).
    """
    check_mesh(mesh)
    with ranks_agree(mesh.sp_group, "shard_batch", device_of(None), check_ranks) as call:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, seqlen] tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        labels = input_ids if labels is None else labels
        for name, x in (("labels", labels), ("position_ids", position_ids), ("attention_mask", attention_mask)):
            if x is not None and tuple(x.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(x.shape)}")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask masks some tokens: USP attention takes whole, unpadded sequences")
        check_layout(layout)
        seqlen = input_ids.shape[1]
        documents = None
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"packed documents (cu_seqlens) need batch 1, got {input_ids.shape[0]} rows")
            documents = document_offsets(cu_seqlens, seqlen)
        expected = positions_in_documents(torch.arange(seqlen, device=input_ids.device), documents)
        if position_ids is not None and not bool((position_ids - position_ids[:, :1] == expected).all()):
            raise ValueError("position_ids must count up by one along each row, or restart at each document of "
                             "cu_seqlens: " + ("pass cu_seqlens for packed documents" if documents is None
                                               else "they do not match cu_seqlens"))
        check_global_seqlen(seqlen, mesh.ulysses_degree, mesh.ring_degree, layout, documents)
        call.fields = dict(shape=tuple(input_ids.shape), layout=layout, ignore_index=ignore_index,
                           input_ids=_fingerprint(input_ids), labels=_fingerprint(labels),
                           documents=None if documents is None else _fingerprint(torch.tensor(documents)))
    shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    attention_kwargs = {}
    if documents is not None:
        ends = torch.tensor(documents[1:], dtype=torch.long) - 1
        shift_labels[:, ends[ends >= 0]] = ignore_index  # a document's last token predicts nothing
        cu = torch.tensor(documents, dtype=torch.int32, device=input_ids.device)
        longest = max(b - a for a, b in zip(documents, documents[1:]))
        attention_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if position_ids is None:
        position_ids = expected.expand_as(input_ids)
    shards = {name: shard_sequence(x, mesh, layout=layout, cu_seqlens=documents) for name, x in
              (("input_ids", input_ids), ("position_ids", position_ids), ("shift_labels", shift_labels))}
    return dict(shards, attention_kwargs=attention_kwargs)


def _all_reduce_over_mesh(x: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Sum ``x`` in place over the sequence-parallel group, then the data-parallel one."""
    for group, size in ((mesh.sp_group, mesh.sp_degree), (mesh.dp_group, mesh.dp_degree)):
        if size > 1:
            dist.all_reduce(x, group=group)
    return x


def sequence_parallel_loss(logits: torch.Tensor, shift_labels: torch.Tensor, mesh: Mesh,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross entropy averaged over every label other than ``ignore_index`` of the whole
    batch: all ranks of ``mesh``, data-parallel replicas included.

    ``logits: [B, S_local, V]``, ``shift_labels: [B, S_local]`` (from ``shard_batch``).
    The value is the global mean on every rank; the gradient is this rank's share of it,
    so that after ``all_reduce_gradients`` every rank holds the gradients of the global
    mean. Half-precision logits are upcast to float32, as transformers' own loss does."""
    if logits.shape[:-1] != shift_labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and shift_labels {tuple(shift_labels.shape)} do not match: "
                         f"pass the shard's labels from shard_batch")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    local = F.cross_entropy(logits.flatten(0, -2), shift_labels.flatten(), ignore_index=ignore_index, reduction="sum")
    totals = torch.stack([local.detach(), (shift_labels != ignore_index).sum().to(local.dtype)])
    total, count = _all_reduce_over_mesh(totals, mesh).unbind()
    return (total + (local - local.detach())) / count  # the value is exactly total / count on every rank


@torch.no_grad()
def all_reduce_gradients(model: torch.nn.Module, mesh: Mesh) -> None:
    """Sum every parameter's gradient over the mesh's sequence- and data-parallel groups
    (one flat all-reduce per dtype and group). With ``sequence_parallel_loss`` the sum is
    the gradient of the batch's mean loss: do not average again. A parameter without a
    gradient on some ranks gets zeros there; one without a gradient anywhere stays None.
    A mesh of one rank has nothing to sum: no copies, no collective, no wait for the GPU."""
    check_mesh(mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or mesh.sp_degree * mesh.dp_degree == 1:
        return
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    present = _all_reduce_over_mesh(present, mesh).tolist()
    grads = []
    for p, anywhere in zip(params, present):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for dtype in sorted({g.dtype for g in grads}, key=str):
        same = [g for g in grads if g.dtype == dtype]
        flat = _all_reduce_over_mesh(torch.cat([g.reshape(-1) for g in same]), mesh)
        for g, piece in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(piece.view_as(g))


__all__ = ["IGNORE_INDEX", "all_reduce_gradients", "sequence_parallel",
           "sequence_parallel_loss", "shard_batch"]
