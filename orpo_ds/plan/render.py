"""The plan as text for a person: memory table, verdict, limits, times, and the launch it suggests."""

from __future__ import annotations

import shlex

from orpo_ds.plan.planner import GIB, Plan


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def suggested_overrides(plan: Plan) -> list[str]:
    """Overrides that make the configured shape fit: checkpointing first, then a smaller row."""
    if plan.fits:
        return []
    fits_checkpointed = plan.budget_other_checkpointing.peak <= plan.cluster.memory_bytes
    if not plan.cfg.model.gradient_checkpointing and fits_checkpointed:
        return ["model.gradient_checkpointing=true"]
    if plan.largest_row_tokens_checkpointed:
        return ["model.gradient_checkpointing=true",
                f"train.micro_batch_tokens={plan.largest_row_tokens_checkpointed}"]
    return []


def sbatch_line(plan: Plan, config_path: str, overrides: list[str]) -> str:
    """The launch/orpo.sbatch submission of this plan's shape (with the fixes it suggests)."""
    words = [*overrides, *suggested_overrides(plan)]
    env = f"CONFIG={shlex.quote(config_path)}" + (f" OVERRIDES={shlex.quote(' '.join(words))}" if words else "")
    return (f"{env} sbatch --nodes={plan.cluster.nodes} --gpus-per-node={plan.cluster.gpus_per_node} "
            f"launch/orpo.sbatch")


def experts_lines(plan: Plan) -> list[str]:
    """Active against held parameters, ZeRO-3's gathers of every expert next to the compute, and the
    expert-parallel what-if (nothing for a dense model)."""
    e, c = plan.experts, plan.cluster
    if e is None:
        return []
    layout, bandwidth = e.layout, c.bandwidth_bytes_s
    lines = [f"experts {layout.experts_per_token} of {layout.experts} per token in {len(layout.moe_layers)}/"
             f"{plan.planner.shape.layers} layers: {e.active_params / 1e9:.2f}B parameters active per token "
             f"(what the FLOPs count), {e.total_params / 1e9:.2f}B held (memory, ZeRO-3's gathers)"]
    gather = e.zero3_gather_bytes
    if gather:
        lines.append(f"        ZeRO-3 gathers every expert, in forward and again in backward: {gather / 1e9:.1f} GB "
                     f"per GPU per step, {_duration(gather / bandwidth)} at {bandwidth / 1e9:.0f} GB/s, against "
                     f"compute {_duration(plan.step.compute_s)} (estimates)")
    ep = e.expert_parallel
    if ep is not None:
        lines.append(f"        with expert parallelism {ep.size} (a what-if: orpo-ds does not run it yet), each GPU "
                     f"holds {ep.experts_per_gpu} of {layout.experts} experts per layer, partitioned over the "
                     f"{c.gpus // ep.size} GPU(s) holding the same ones: gathers "
                     f"{ep.gather_bytes / 1e9:.1f} GB + all-to-all {ep.all_to_all_bytes / 1e9:.1f} GB per GPU per "
                     f"step (routing assumed uniform), {_duration(ep.total_bytes / bandwidth)} at "
                     f"{bandwidth / 1e9:.0f} GB/s; model states per GPU unchanged")
    return lines


def render(plan: Plan, config_path: str, overrides: list[str]) -> str:
    b, c, s, z = plan.budget, plan.cluster, plan.planner.shape, plan.planner.zero
    other = plan.budget_other_checkpointing.activations
    ckpt = plan.cfg.model.gradient_checkpointing
    offload = " + ".join(k for k, on in (("optimizer", z.offload_optimizer), ("parameters", z.offload_param)) if on)
    lines = [
        f"model   {plan.cfg.model.name_or_path}: {s.total_params / 1e9:.2f}B parameters, "
        f"{s.trainable_params / 1e9:.2f}B trained ({s.trainable_layers}/{s.layers} layers)",
        f"cluster {c.nodes} node(s) x {c.gpus_per_node} {c.gpu_name}, {c.memory_bytes / GIB:.0f} GiB each; "
        f"ZeRO-{z.stage}"
        + (f", {offload} offloaded to the CPU" if offload else "")
        + f"; {'bf16' if plan.planner.dtype_bytes == 2 else 'fp32'}",
        f"rows    {plan.rows.source}",
        f"        largest row {plan.rows.largest_row_tokens} tokens, {plan.rows.head_fraction:.0%} reaching the head",
        "",
        "per GPU                                       bytes",
        f"  parameters                             {_gib(b.states.parameters)}",
        f"  gradients                              {_gib(b.states.gradients)}",
        f"  optimizer states (fp32 master, AdamW)  {_gib(b.states.optimizer)}",
        f"  = model states                         {_gib(b.states.total)}",
        f"  gathered parameters (ZeRO-3)           {_gib(b.gathered_parameters)}",
        f"  communication buffers                  {_gib(b.communication_buffers)}",
        f"  activations saved{' (checkpointed)' if ckpt else '':22}{_gib(b.activations.saved)}"
        f"   ({'without' if ckpt else 'with'} checkpointing: {other.saved / GIB:.2f} GiB)",
        f"  layer backward (one at a time)         {_gib(b.activations.layer_backward)}",
        f"  chunked head backward                  {_gib(b.activations.head_backward)}"
        f"   (full [M, V] logits: {b.activations.full_logits / GIB:.2f} GiB)",
        f"  optimizer step fp32 gradient copy      {_gib(b.optimizer_step_transient)}",
        f"  reserve (CUDA context, NCCL, allocator){_gib(b.reserve)}",
        f"  = peak                                 {_gib(b.peak)}   of {c.memory_bytes / GIB:.0f} GiB "
        f"(the two backward phases, and the optimizer step, do not overlap)",
    ]
    if b.states.host:
        lines.append(f"  host memory per GPU (offloaded)        {_gib(b.states.host)}")
    headroom = c.memory_bytes - b.peak
    lines += ["", f"verdict: {'FITS' if plan.fits else 'DOES NOT FIT'}, "
              f"{abs(headroom) / GIB:.2f} GiB {'to spare' if plan.fits else 'over'}"]
    row = plan.largest_row_tokens
    lines.append(f"largest train.micro_batch_tokens that fits: {row if row else 'none'}"
                 f" ({'checkpointed' if ckpt else 'no checkpointing'}); with checkpointing: "
                 f"{plan.largest_row_tokens_checkpointed or 'none'}")
    lines.append(f"fewest GPUs for this row: {plan.fewest_gpus or f'more than {4096}'}")
    sp, needed = plan.planner.sequence_parallel, plan.sequence_parallel_needed
    if sp > 1 or needed != 1:
        lines.append(f"sequence parallel: {sp} (each GPU holds 1/{sp} of every row); this row needs "
                     f"{needed if needed else f'more than these {c.gpus} GPUs can give'}"
                     + (" (train.sequence_parallel_size)" if needed and needed > 1 else ""))
    lines += ["", f"step    {_duration(plan.step.total_s)} = compute {_duration(plan.step.compute_s)} at MFU "
              f"{plan.mfu:.0%} ({plan.mfu_source}) + ZeRO traffic {plan.traffic_bytes / 1e9:.1f} GB at "
              f"{c.bandwidth_bytes_s / 1e9:.0f} GB/s {_duration(plan.step.communication_s)}"
              + (f" + Ulysses all-to-all {plan.sequence_parallel_bytes / 1e9:.1f} GB at "
                 f"{c.sequence_parallel_bandwidth(sp) / 1e9:.0f} GB/s {_duration(plan.step.sequence_parallel_s)}"
                 if sp > 1 else "") + " (not overlapped)"]
    lines += experts_lines(plan)
    if plan.epoch_s is not None:
        lines.append(f"epoch   {plan.rows.steps_per_epoch} steps, {_duration(plan.epoch_s)}")
    lines += [f"note    {n}" for n in plan.notes]
    lines += ["", "launch:", f"  {sbatch_line(plan, config_path, overrides)}",
              f"  (engine settings: {plan.cfg.deepspeed.config}; --write-ds-config PATH writes them)"]
    return "\n".join(lines)
