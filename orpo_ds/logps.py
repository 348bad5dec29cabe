"""Per-token log-probs of labels from final hidden states, without materialising ``[N, V]`` logits.

The LM head is folded into the log-prob computation and run over chunks of ``chunk_size`` tokens:

    logits = (hidden @ weight.T + bias) * logit_scale          matmul in the input dtype (as HF does)
    logits = softcap * tanh(logits / softcap)                  optional, Gemma-2 final-logit soft-capping
    logp   = log_softmax(logits.float()).gather(label)         fp32

The autograd Function saves only its inputs plus one fp32 log-sum-exp per token; backward recomputes each
chunk's logits. Extra memory is therefore O(chunk_size * V) instead of O(N * V), at the price of one extra
``[C, H] x [H, V]`` matmul per chunk in backward (4 matmuls in all instead of 3).

Nothing here reads the device from the host: every shape is known from the inputs' shapes and the
input checks run on the device, so a training micro-batch never stalls the CPU here (tests/unit/test_host_syncs.py).

Plain torch only: under ZeRO-3 the caller runs this inside a module forward, with the gathered LM head
weight, so nothing here may touch DeepSpeed.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "auto_chunk_size", "chunked_token_logps", "sequence_logp_sums", "sequence_mean_logps",
           "sequence_means"]

# The fp32 [chunk, V] buffer auto_chunk_size keeps to: 1024 tokens up to a 64k vocabulary, 512 at
# Llama-3's 128k. Time barely depends on the chunk between 512 and 2048 tokens (benchmarks/RESULTS.md),
# while at V = 128256 a 1024-token chunk alone holds 525 MB.
AUTO_CHUNK_BYTES = 256 * 2**20


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per head chunk for ``loss.chunk_size: null``: at most 1024, at least 64, a multiple of 64,
    and an fp32 ``[chunk, vocab_size]`` buffer of at most :data:`AUTO_CHUNK_BYTES` where that allows 64."""
    fitting = AUTO_CHUNK_BYTES // (4 * vocab_size) // 64 * 64
    return max(64, min(1024, fitting))


def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Log-prob of each token's label under the LM head, computed ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[N, H]`` final hidden states, fp32 or bf16 (any float dtype works).
        weight: ``[V, H]`` LM head weight, same dtype and device as ``hidden``.
        labels: ``[N]`` integer class ids in ``[0, V)``, or ``-100`` for tokens that carry no loss (they
            still cost their share of the head's compute: select the scored rows before the call). Out of
            range: a RuntimeError on the CPU, a device-side assert on CUDA.
        bias: ``[V]`` LM head bias (same dtype) or None.
        logit_scale: multiplies the logits before soft-capping (Cohere-style ``logit_scale``).
        softcap: if set, ``logits = softcap * tanh(logits / softcap)``.
        chunk_size: tokens per chunk; extra memory is about ``chunk_size * V * 4`` bytes (x2 with softcap,
            +``chunk_size * V * 2`` for bf16 inputs).
    Returns:
        ``[N]`` fp32 ``log P(label)``; exactly 0.0 (with zero gradient) where ``labels == -100``.
        Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; gradients come back in their dtypes.
    """
    _check_inputs(hidden, weight, labels, bias, softcap, chunk_size)
    return _ChunkedTokenLogps.apply(
        hidden, weight, bias, labels.long(), float(logit_scale),
        None if softcap is None else float(softcap), int(chunk_size),
    )


def _check_inputs(hidden, weight, labels, bias, softcap, chunk_size) -> None:
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    n, h = hidden.shape
    v = weight.shape[0]
    if weight.shape[1] != h:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} disagree on H")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share one float dtype; got {hidden.dtype} and {weight.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must be [N] = [{n}]; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got {labels.dtype}")
    if bias is not None and (bias.shape != (v,) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V] = [{v}] of dtype {weight.dtype}; got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None; got {softcap}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    # An out-of-range label would make gather read garbage (CPU) or kill the CUDA context. The check runs on
    # the device (torch._assert_async): reading the answer back would stall the host once per micro-batch.
    # Training never gets here with one: the trainer checks the data's token ids against the vocabulary
    # on the host.
    valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < v))
    torch._assert_async(valid.all(), f"labels must be in [0, {v}) or {IGNORE_INDEX}")


def _chunk_logits(h, weight, bias, logit_scale, out32, out_lp):
    """fp32 ``(h @ weight.T + bias) * logit_scale`` for ``h`` ``[c, H]``, written into ``out32[:c]``.

    The matmul runs in the input dtype; for non-fp32 inputs it lands in ``out_lp`` and is upcast into
    ``out32``. Reusing preallocated buffers avoids re-faulting ``C x V`` fresh pages every chunk on CPU.
    """
    c = h.shape[0]
    dst = out32[:c] if out_lp is None else out_lp[:c]
    if bias is None:
        torch.mm(h, weight.t(), out=dst)
    else:
        torch.addmm(bias, h, weight.t(), out=dst)
    z = out32[:c]
    if out_lp is not None:
        z.copy_(dst)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    return z


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, logit_scale, softcap, chunk_size):
        # Every row goes through the head, ignored ones included: selecting the labelled rows would give a
        # shape only the device knows (a host sync). Callers select the positions to score on the host
        # (PolicyWithChunkedHead's head_positions), so ignored rows are rare here; they score class 0 and
        # are zeroed below, and their gradient is zeroed in backward.
        scored = labels != IGNORE_INDEX
        tgt = labels.clamp(min=0)
        n, v = labels.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        buf32, buf_lp = _buffers(min(chunk_size, n), v, hidden, 1)
        # Autocast would silently change the matmul dtype (and differently in backward, which autocast
        # does not cover), so the dtype contract is enforced by switching it off.
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                z = _chunk_logits(hidden[s:s + chunk_size], weight, bias, logit_scale, buf32[0], buf_lp)
                if softcap is not None:
                    z.div_(softcap).tanh_().mul_(softcap)
                picked = z.gather(1, tgt[s:s + chunk_size, None]).squeeze(1)
                # logsumexp by hand, in place on the chunk: torch.logsumexp allocates two more C x V
                # temporaries and is ~2x slower on CPU.
                m = z.amax(1)
                lse_c = z.sub_(m[:, None]).exp_().sum(1).log_().add_(m)
                lse[s:s + chunk_size] = lse_c
                out[s:s + chunk_size] = picked - lse_c
        out.masked_fill_(~scored, 0.0)
        ctx.save_for_backward(hidden, weight, bias, scored, tgt, lse)
        ctx.logit_scale, ctx.softcap, ctx.chunk_size = logit_scale, softcap, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, scored, tgt, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        softcap, chunk_size = ctx.softcap, ctx.chunk_size
        n, v = tgt.shape[0], weight.shape[0]
        # d logp / d raw_logit = (onehot - p) * (1 - tanh^2) * logit_scale: linear in the upstream
        # gradient, so logit_scale is folded into it once instead of scaling every C x V chunk. Ignored rows
        # get none (their output is a constant 0).
        g = grad_out.float().masked_fill(~scored, 0.0) * ctx.logit_scale

        # empty: every row is written below
        grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
        # fp32 accumulators across chunks (per-chunk bf16 partials would lose low bits at every add).
        grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b32 = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
        w_lp = (torch.empty_like(weight, memory_format=torch.contiguous_format)
                if need_w and weight.dtype != torch.float32 else None)

        buf32, buf_lp = _buffers(min(chunk_size, n), v, hidden, 1 if softcap is None else 2)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk_size):
                h = hidden[s:s + chunk_size]
                z = _chunk_logits(h, weight, bias, ctx.logit_scale, buf32[0], buf_lp)
                c = z.shape[0]
                gc = g[s:s + chunk_size, None]
                lse_c = lse[s:s + chunk_size, None]
                if softcap is None:
                    grad = z.sub_(lse_c).exp_()                      # softmax probabilities p
                else:
                    tanh = z.div_(softcap).tanh_()
                    grad = torch.mul(tanh, softcap, out=buf32[1][:c]).sub_(lse_c).exp_()
                grad.mul_(gc.neg())                                   # -g * p
                grad.scatter_add_(1, tgt[s:s + chunk_size, None], gc)  # + g at the label
                if softcap is not None:
                    grad.mul_(tanh.square_().neg_().add_(1.0))        # * (1 - tanh^2)
                if need_b:
                    grad_b32.add_(grad.sum(0))
                if buf_lp is not None:                               # grads in the input dtype, like HF
                    grad = buf_lp[:c].copy_(grad)
                if need_h:
                    torch.mm(grad, weight, out=grad_h[s:s + chunk_size])
                if need_w:
                    if w_lp is None:
                        grad_w32.addmm_(grad.t(), h)
                    else:
                        grad_w32.add_(torch.mm(grad.t(), h, out=w_lp))
        grad_w = grad_w32.to(weight.dtype) if need_w else None
        grad_b = grad_b32.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def _buffers(c_max, v, hidden, n32):
    """Preallocated chunk buffers: ``n32`` fp32 ``[C, V]`` buffers and, for non-fp32 inputs, one
    ``[C, V]`` buffer in the input dtype (matmul result, then the gradient cast back to that dtype)."""
    b32 = tuple(torch.empty(c_max, v, dtype=torch.float32, device=hidden.device) for _ in range(n32))
    lp = None if hidden.dtype == torch.float32 else torch.empty(c_max, v, dtype=hidden.dtype,
                                                                  device=hidden.device)
    return b32, lp


def sequence_logp_sums(
    token_logps: torch.Tensor,
    seq_id: torch.Tensor,
    num_sequences: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token log-probs and number of counted tokens per sequence of a packed batch.

    Args:
        token_logps: ``[N]`` per-token log-probs (any float dtype; summed in fp32).
        seq_id: ``[N]`` integer sequence index of each token, in ``[0, num_sequences)``.
        num_sequences: ``S``.
        mask: ``[N]`` bool, True for tokens that count; default all.
    Returns:
        ``(sums [S] fp32, counts [S] int64)``. ``sums`` is differentiable w.r.t. ``token_logps``;
        masked-out tokens contribute 0 and get a zero gradient even if their value is inf/NaN.
    """
    n = token_logps.shape[0] if token_logps.dim() == 1 else -1
    if token_logps.dim() != 1 or seq_id.shape != (n,):
        raise ValueError(f"token_logps and seq_id must both be [N]; got {tuple(token_logps.shape)} and "
                         f"{tuple(seq_id.shape)}")
    if seq_id.is_floating_point() or seq_id.is_complex() or seq_id.dtype == torch.bool:
        raise ValueError(f"seq_id must be an integer tensor; got {seq_id.dtype}")
    if num_sequences < 0:
        raise ValueError(f"num_sequences must be >= 0; got {num_sequences}")
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a [N] = [{n}] bool tensor; got {tuple(mask.shape)} {mask.dtype}")
    # Checked on the device: reading the answer back would stall the host once per micro-batch.
    torch._assert_async(((seq_id >= 0) & (seq_id < num_sequences)).all(), f"seq_id must be in [0, {num_sequences})")
    seq_id = seq_id.long()
    vals = token_logps.float()
    if mask is None:
        ones = torch.ones(n, dtype=torch.int64, device=seq_id.device)
    else:
        # where, not multiply: 0 * inf = NaN would poison the sum and the gradient.
        vals = torch.where(mask, vals, torch.zeros_like(vals))
        ones = mask.long()
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=vals.device).index_add(0, seq_id, vals)
    counts = torch.zeros(num_sequences, dtype=torch.int64, device=seq_id.device).index_add(0, seq_id, ones)
    return sums, counts


def sequence_mean_logps(
    token_logps: torch.Tensor,
    seq_id: torch.Tensor,
    num_sequences: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Average token log-prob per sequence (the length-normalised log-prob ORPO uses).

    Args: as :func:`sequence_logp_sums`.
    Returns:
        ``[S]`` fp32 ``sums / counts``.
    Raises:
        RuntimeError: if any sequence has no counted token (a mean over zero tokens would be NaN and silently
            poison the loss); raised on the CPU at once, on CUDA as a device-side assert.
    """
    return sequence_means(*sequence_logp_sums(token_logps, seq_id, num_sequences, mask))


def sequence_means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[S]`` fp32 ``sums / counts`` (as :func:`sequence_logp_sums` returns them, maybe summed over the
    ranks that share a row). Raises as :func:`sequence_mean_logps` does for a sequence with no token."""
    # On the device, like sequence_logp_sums' check. The packer never builds such a sequence
    # (TokenizedPair requires a scored token in each response), so this guards the function's contract.
    torch._assert_async((counts > 0).all(), f"a sequence has no loss tokens (every token masked or labelled "
                                            f"{IGNORE_INDEX}); its mean log-prob is undefined")
    return sums / counts.to(sums.dtype)
