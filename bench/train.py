"""``usp-bench train``: loss parity of a model trained with USP against the same model
trained on one process.

Builds a small causal LM of the LLaMA family from a config (random weights, seeded:
nothing is downloaded), trains it with AdamW on a seeded synthetic token stream (a
random successor chain with noise, so the loss falls) on ``--world-size`` gloo
processes, once per ``--mesh u x r`` and ``--layout`` (the rest of the world is data
parallel: ``dp = world / (u r)``), through ``usp.attention.hf``; and once in one process
with transformers' own SDPA attention over the whole batch and a plain shifted cross
entropy, the independent reference. Per step: both losses, their relative difference,
tokens/s and model TFLOP/s per process (bf16 on a GPU whose peak is known: MFU); the
first step's gradients (after the all-reduce) against the reference's; at the end the
largest parameter difference. Fails (exit status 1) when a loss, or the first step's
gradients (relative to their largest magnitude), differ by more than the bar of the
dtype: 1e-10 relative in fp64, 1e-4 in fp32 (bf16, autocast over fp32 weights, has no
bar: its differences are reported). The gradients are checked on their own because
AdamW hides a wrong gradient scale from the losses.

Under ``torchrun`` every process is a rank (NCCL with one GPU each, else gloo) and rank
0 trains the reference on its own device first:
``torchrun --nproc-per-node 8 -m usp.bench train --mesh 4x2`` (bf16 by default there;
fp64, which the GPU kernels do not run, is refused).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from usp.attention.layout import LAYOUTS, check_global_seqlen
from usp.comm import init_mesh
from usp.comm.heads import heads_problem

from .cli_args import add_output_arguments, bounded_int, mesh_type, positive_float, world_size_type
from .flops import attention_flops
from .launch import cores_available, join_torchrun_group, under_torchrun
from .launch import run as launch_run
from .results import device_name, write_result
from .timing import synchronize

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}  # transformers' class-name prefixes
# weights' dtype per --dtype; bf16 is autocast over float32 weights
WEIGHT_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.float32}
PARITY_BAR = {"fp64": 1e-10, "fp32": 1e-4}  # largest relative loss difference at any step
NEXT_TOKEN_KEPT = 0.75  # chance that the synthetic stream follows its successor table
# Dense bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets; the first name
# the device's name contains wins (the PCIe H100 before the SXM one).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
FLOP_COUNT = ("6 FLOPs per weight of every linear layer (lm_head included, embeddings not) per token, plus "
              "attention by the benchmark convention (causal counted as half, fwd+bwd 3.5x the forward)")


@dataclass(frozen=True)
class TrainSetup:
    family: str
    vocab: int
    hidden: int
    ffn_hidden: int
    layers: int
    heads: int
    kv_heads: int
    seqlen: int
    batch: int  # global rows per step, split over the data-parallel replicas
    steps: int
    lr: float
    seed: int
    dtype: str
    zero: bool  # shard the optimizer state over the world (torch's ZeroRedundancyOptimizer)


def build_model(setup: TrainSetup, device: torch.device) -> torch.nn.Module:
    """The causal LM, initialised from ``setup.seed`` (equal in every process)."""
    import transformers

    prefix = FAMILIES[setup.family]
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=setup.vocab, hidden_size=setup.hidden, intermediate_size=setup.ffn_hidden,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads,
        max_position_embeddings=setup.seqlen, tie_word_embeddings=False, use_cache=False)
    if hasattr(config, "sliding_window"):
        config.sliding_window = None  # full causal attention in every family
    torch.manual_seed(setup.seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).to(WEIGHT_DTYPES[setup.dtype])
    return model.to(device).train()


def token_stream(setup: TrainSetup) -> torch.Tensor:
    """``[steps, batch, seqlen]`` token ids: each token is its predecessor's fixed random
    successor with probability ``NEXT_TOKEN_KEPT``, else uniform."""
    generator = torch.Generator().manual_seed(setup.seed + 1)
    shape = (setup.steps, setup.batch, setup.seqlen)
    successor = torch.randperm(setup.vocab, generator=generator)
    noise = torch.randint(setup.vocab, shape, generator=generator)
    kept = torch.rand(shape, generator=generator) < NEXT_TOKEN_KEPT
    tokens = noise.clone()
    for t in range(1, setup.seqlen):
        tokens[..., t] = torch.where(kept[..., t], successor[tokens[..., t - 1]], noise[..., t])
    return tokens


def training_flops(model, setup: TrainSetup) -> float:
    """FLOPs of one optimizer step over the global batch, counted as ``FLOP_COUNT`` says."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head_dim = setup.hidden // setup.heads
    attention = setup.layers * attention_flops(setup.batch, setup.heads, setup.seqlen, setup.seqlen, head_dim,
                                               causal=True, pass_="fwd+bwd")
    return 6.0 * linear * setup.batch * setup.seqlen + attention


def train(model, setup: TrainSetup, device: torch.device, loss_of, after_backward=None, label: str = "",
          progress: bool = True) -> dict:
    """AdamW over the token stream (its state sharded over every process with
    ``setup.zero``); ``loss_of(batch [B, S]) -> scalar loss`` runs under bf16 autocast for
    ``bf16``; ``after_backward()`` before each optimizer step. Returns per-step losses and
    seconds, and the first step's gradients (flat, in the order of ``flat_parameters``)."""
    options = dict(lr=setup.lr, weight_decay=0.01)
    if setup.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, **options)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **options)
    losses, seconds, first_gradients = [], [], None
    for step, batch in enumerate(token_stream(setup).to(device)):
        synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=setup.dtype == "bf16"):
            loss = loss_of(batch)
        loss.backward()
        if after_backward is not None:
            after_backward()
        if step == 0:
            first_gradients = _flat(p.grad for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        if progress and (step + 1 == setup.steps or (step + 1) % 10 == 0):
            print(f"  {label}: step {step + 1}/{setup.steps}, loss {losses[-1]:.6f}", flush=True)
    return dict(losses=losses, seconds=seconds, first_gradients=first_gradients)


def _flat(tensors) -> np.ndarray:
    """The tensors flattened into one, on the host (numpy: it travels between processes by value)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu().numpy()


def flat_parameters(model) -> np.ndarray:
    return _flat(model.parameters())


def reference_run(setup: TrainSetup, device: torch.device) -> dict:
    """One process, the whole batch, transformers' SDPA attention, the plain shifted loss."""
    model = build_model(setup, device)
    model.set_attn_implementation("sdpa")

    def loss_of(batch):
        logits = model(input_ids=batch).logits
        logits = logits.float() if setup.dtype == "bf16" else logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    setup_for_one = TrainSetup(**{**asdict(setup), "zero": False})  # nothing to shard on one process
    result = train(model, setup_for_one, device, loss_of, label="one process")
    return dict(result, parameters=flat_parameters(model), flops=training_flops(model, setup))


def rank_main(setup: TrainSetup, configs: list[tuple[int, int, str]], device_type: str = "cpu") -> list[dict]:
    """On every rank: train once per ``(u, r, layout)``; rank 0 also returns the parameters."""
    from usp.attention.hf import all_reduce_gradients, sequence_parallel, sequence_parallel_loss, shard_batch

    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    results = []
    for u, r, layout in configs:
        mesh = init_mesh(u, r)
        model = sequence_parallel(build_model(setup, device), mesh, layout=layout)
        rows = setup.batch // mesh.dp_degree

        def loss_of(batch):
            shard = shard_batch(mesh, batch[mesh.dp_rank * rows:(mesh.dp_rank + 1) * rows], layout=layout)
            logits = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"]).logits
            return sequence_parallel_loss(logits, shard["shift_labels"], mesh)

        first = dist.get_rank() == 0  # prints progress; only its gradients and parameters are compared
        result = train(model, setup, device, loss_of, lambda: all_reduce_gradients(model, mesh),
                       label=config_name(u, r, mesh.dp_degree, layout), progress=first)
        results.append(dict(result, first_gradients=result["first_gradients"] if first else None,
                            parameters=flat_parameters(model) if first else None))
    return results


def config_name(u: int, r: int, dp: int, layout: str) -> str:
    return (f"dp{dp}-" if dp > 1 else "") + f"u{u}r{r}" + (f"-{layout}" if r > 1 else "")


def peak_tflops(device: torch.device, dtype: str) -> float | None:
    """The GPU's dense bf16 peak (``PEAK_BF16_TFLOPS``) for a bf16 run; None on a CPU, an
    unknown GPU or another dtype (MFU is quoted against the bf16 peak only)."""
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = device_name(device)
    return next((peak for model, peak in PEAK_BF16_TFLOPS if model in name), None)


def compare(setup: TrainSetup, reference: dict, per_rank: list[list[dict]], configs, world_size: int,
            peak: float | None = None) -> list[dict]:
    """One record per configuration: its losses beside the reference's, the differences,
    throughput (the slowest rank's step) and, given the GPU's ``peak``, MFU."""
    tokens = setup.batch * setup.seqlen
    bar = PARITY_BAR.get(setup.dtype)
    records = []
    for index, (u, r, layout) in enumerate(configs):
        ours = per_rank[0][index]
        step_seconds = [max(rank[index]["seconds"][step] for rank in per_rank) for step in range(setup.steps)]
        relative = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], reference["losses"])]
        reference_gradients = reference["first_gradients"]
        gradient_difference = float(np.abs(ours["first_gradients"] - reference_gradients).max()
                                    / np.abs(reference_gradients).max())
        parameter_difference = float(np.abs(ours["parameters"] - reference["parameters"]).max())
        tflops_per_process = [reference["flops"] / s / world_size / 1e12 for s in step_seconds]
        records.append(dict(
            name=config_name(u, r, world_size // (u * r), layout), ulysses_degree=u, ring_degree=r,
            dp_degree=world_size // (u * r), layout=layout if r > 1 else None, losses=ours["losses"],
            reference_losses=reference["losses"], relative_difference=relative,
            max_relative_difference=max(relative), max_parameter_difference=parameter_difference,
            max_relative_parameter_difference=parameter_difference / float(np.abs(reference["parameters"]).max()),
            first_step_gradient_difference=gradient_difference,
            tokens_per_s=[tokens / s for s in step_seconds],
            reference_tokens_per_s=[tokens / s for s in reference["seconds"]],
            model_tflops_per_process=tflops_per_process,
            mfu=None if peak is None else [t / peak for t in tflops_per_process],
            parity_bar=bar, parity=None if bar is None else max(relative) <= bar and gradient_difference <= bar))
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=world_size_type, default=4,
                        help="gloo processes to launch (under torchrun: its WORLD_SIZE)")
    parser.add_argument("--mesh", type=mesh_type, nargs="+", default=[(4, 1), (2, 2), (1, 4), (1, 2)],
                        help="meshes u x r; the world's remaining factor is data parallel (1x2 on 4 processes: "
                             "dp 2)")
    parser.add_argument("--layout", choices=LAYOUTS, nargs="+", default=list(LAYOUTS),
                        help="ring layouts (a mesh without a ring runs once)")
    parser.add_argument("--model", dest="family", choices=sorted(FAMILIES), default="llama",
                        help="model family (architecture only, built from a config)")
    parser.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES),
                        help="weights and compute (bf16: autocast over fp32 weights; default: fp64 on CPUs, bf16 "
                             "under torchrun with GPUs)")
    parser.add_argument("--zero", action="store_true",
                        help="shard AdamW's state over every process (torch's ZeroRedundancyOptimizer)")
    parser.add_argument("--steps", type=bounded_int(1), default=20, help="optimizer steps")
    parser.add_argument("--seqlen", type=bounded_int(2), default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=bounded_int(1), default=2, help="sequences per step (global)")
    parser.add_argument("--vocab", type=bounded_int(2), default=128, help="vocabulary size")
    parser.add_argument("--hidden", type=bounded_int(1), default=64, help="hidden size")
    parser.add_argument("--ffn-hidden", type=bounded_int(1), default=128, help="MLP hidden size")
    parser.add_argument("--layers", type=bounded_int(1), default=2, help="decoder layers")
    parser.add_argument("--heads", type=bounded_int(1), default=4, help="query heads")
    parser.add_argument("--kv-heads", type=bounded_int(1), default=2, help="K/V heads")
    parser.add_argument("--lr", type=positive_float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the token stream")
    parser.add_argument("--timeout", type=positive_float, default=1800.0,
                        help="seconds before the launched run is killed")
    add_output_arguments(parser)


def _setup_and_configs(args, world_size: int) -> tuple[TrainSetup, list[tuple[int, int, str]]]:
    """The options checked, with a message naming the option at fault."""
    if args.hidden % args.heads:
        raise SystemExit(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    gpus = under_torchrun() and torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if gpus else "fp64")
    if gpus and dtype == "fp64":
        raise SystemExit("--dtype fp64: the GPU kernels do not run float64; pick fp32 or bf16")
    configs = []
    for u, r in dict.fromkeys(args.mesh):
        if world_size % (u * r):
            raise SystemExit(f"--mesh {u}x{r}: u x r must divide the world size {world_size}")
        if args.batch % (world_size // (u * r)):
            raise SystemExit(f"--mesh {u}x{r}: --batch {args.batch} must be divisible by the data-parallel degree "
                             f"{world_size // (u * r)}")
        problem = heads_problem(args.heads, args.kv_heads, u)
        if problem:
            raise SystemExit(f"--mesh {u}x{r}: {problem}")
        for layout in args.layout if r > 1 else args.layout[:1]:
            try:
                check_global_seqlen(args.seqlen, u, r, layout)
            except ValueError as error:
                raise SystemExit(f"--mesh {u}x{r}: {error}") from None
            configs.append((u, r, layout))
    setup = TrainSetup(args.family, args.vocab, args.hidden, args.ffn_hidden, args.layers, args.heads, args.kv_heads,
                       args.seqlen, args.batch, args.steps, args.lr, args.seed, dtype, args.zero)
    return setup, configs


def run(args: argparse.Namespace) -> int:
    try:
        import transformers
    except ImportError:
        print("usp-bench train needs transformers: pip install \"usp-attention[hf]\"", file=sys.stderr)
        return 2
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.world_size
    setup, configs = _setup_and_configs(args, world_size)
    names = [config_name(u, r, world_size // (u * r), layout) for u, r, layout in configs]
    if under_torchrun():
        return _run_under_torchrun(args, setup, configs, names)
    _announce(setup, transformers.__version__)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has
    try:
        reference = reference_run(setup, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    print(f"  {world_size} gloo processes, one CPU thread each: {', '.join(names)}", flush=True)
    per_rank = launch_run(world_size, rank_main, (setup, configs), pg_timeout_s=min(args.timeout, 300.0),
                          timeout_s=args.timeout)
    records = compare(setup, reference, per_rank, configs, world_size)
    return report(setup, records, world_size, "gloo", torch.device("cpu"), args)


def _run_under_torchrun(args, setup: TrainSetup, configs, names: list[str]) -> int:
    """Every process a rank; rank 0 trains the reference first, then gathers and reports."""
    import transformers

    device = join_torchrun_group(args.timeout)
    backend = dist.get_backend()
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if rank == 0:
            _announce(setup, transformers.__version__)
            reference = reference_run(setup, device)
            print(f"  {world_size} {backend} ranks: {', '.join(names)}", flush=True)
        dist.barrier()
        mine = rank_main(setup, configs, device.type)
        gathered = [None] * world_size
        dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
        if rank != 0:
            return 0
        records = compare(setup, reference, gathered, configs, world_size, peak_tflops(device, setup.dtype))
        return report(setup, records, world_size, backend, device, args)
    finally:
        dist.destroy_process_group()


def _announce(setup: TrainSetup, version: str) -> None:
    print(f"train: {setup.family} ({setup.layers} layers, hidden {setup.hidden}, {setup.heads} heads, "
          f"{setup.kv_heads} K/V heads), {setup.steps} AdamW steps{' (ZeRO)' if setup.zero else ''} of "
          f"{setup.batch} x {setup.seqlen} tokens, {setup.dtype}; transformers {version}", flush=True)


def report(setup: TrainSetup, records: list[dict], world_size: int, process_group: str, device: torch.device,
           args) -> int:
    """The table, the JSON; exit status 1 when a configuration missed the parity bar."""
    import transformers

    bar = PARITY_BAR.get(setup.dtype)
    mfu = records[0]["mfu"] is not None
    print(f"\n{'config':<22} {'final loss':>12} {'max rel loss diff':>18} {'step-1 grad diff':>17} "
          f"{'max param diff':>15} {'tokens/s':>10} "
          f"{'one process':>12} {'MFU' if mfu else 'TFLOP/s/proc':>12}  "
          f"parity ({f'bar {bar:g}' if bar else 'no bar for ' + setup.dtype}; throughput: slowest rank, median step)")
    for record in records:
        verdict = "-" if record["parity"] is None else "ok" if record["parity"] else "MISSED"
        rate = _median(record["mfu"] if mfu else record["model_tflops_per_process"])
        print(f"{record['name']:<22} {record['losses'][-1]:>12.6f} {record['max_relative_difference']:>18.2e} "
              f"{record['first_step_gradient_difference']:>17.2e} {record['max_parameter_difference']:>15.2e} "
              f"{_median(record['tokens_per_s']):>10.0f} "
              f"{_median(record['reference_tokens_per_s']):>12.0f} {rate:>12.4g}  {verdict}")
    cores = cores_available()
    config = dict(asdict(setup), world_size=world_size, process_group=process_group, cores=cores,
                  transformers=transformers.__version__,
                  oversubscribed=process_group == "gloo" and world_size > cores,
                  token_stream=f"successor chain, kept with p = {NEXT_TOKEN_KEPT}",
                  reference="one process, transformers' SDPA attention, whole batch, plain shifted cross entropy",
                  flop_count=FLOP_COUNT, peak_tflops=peak_tflops(device, setup.dtype))
    path = write_result("train", device, dict(config=config, records=records), args.out_dir)
    print(f"wrote {path}")
    missed = [r["name"] for r in records if r["parity"] is False]
    if missed:
        print(f"parity missed (relative loss or step-1 gradient difference above {bar:g}): {', '.join(missed)}",
              file=sys.stderr)
    return 1 if missed else 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan
