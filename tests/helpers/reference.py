"""A naive, padded ORPO reference in the style of TRL's ORPOTrainer, for parity tests of the fast path.

Full [B, T, V] logits, right padding with an attention mask, log1p(-exp(.)) as TRL writes it, and a plain
torch optimizer: nothing shared with the trainer's packing, chunked head or DeepSpeed engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_batch(pairs, pad_id: int):
    """Rows 0..P-1: prompt + chosen; rows P..2P-1: prompt + rejected. Returns ids, attention mask,
    response mask and prompt mask, all [2P, T] (masks mark the *token*, not the predicting position)."""
    seqs, resp, prompt = [], [], []
    for part in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            r = list(getattr(p, part))
            seqs.append(list(p.prompt_ids) + r)
            prompt.append([1] * len(p.prompt_ids) + [0] * len(r))
            resp.append([0] * len(p.prompt_ids) + [1] * len(r))
    width = max(map(len, seqs))

    def pad(rows, value):
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    return pad(seqs, pad_id), pad([[1] * len(s) for s in seqs], 0), pad(resp, 0).bool(), pad(prompt, 0).bool()


def reference_step_loss(model, pairs, *, beta: float, nll_on_prompt: bool, pad_id: int):
    """Loss and TRL-named metrics of one step over ``pairs``, computed the slow, obvious way."""
    ids, attn, resp, prompt = padded_batch(pairs, pad_id)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float()  # [2P, T, V]
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)
    target = ids[:, 1:]
    token_logp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [2P, T-1]
    resp_t = resp[:, 1:]
    avg = (token_logp * resp_t).sum(-1) / resp_t.sum(-1)
    n = len(pairs)
    c, r = avg[:n], avg[n:]
    nll_mask = resp_t[:n] | (prompt[:n, 1:] if nll_on_prompt else torch.zeros_like(resp_t[:n]))
    nll_loss = -(token_logp[:n] * nll_mask).sum() / nll_mask.sum()
    log_odds = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    ratio = F.logsigmoid(log_odds)
    loss = nll_loss - beta * ratio.mean()
    metrics = {
        "loss": loss.item(), "nll_loss": nll_loss.item(), "log_odds_ratio": ratio.mean().item(),
        "log_odds_chosen": log_odds.mean().item(), "rewards/chosen": beta * c.mean().item(),
        "rewards/rejected": beta * r.mean().item(), "rewards/margins": beta * (c - r).mean().item(),
        "rewards/accuracies": (c > r).float().mean().item(), "logps/chosen": c.mean().item(),
        "logps/rejected": r.mean().item(),
    }
    return loss, metrics


def reference_train(model, steps_pairs, *, beta: float, nll_on_prompt: bool, pad_id: int, lr: float,
                    max_grad_norm: float, total_steps: int, schedule_factor) -> list[dict]:
    """Plain single-process torch training over the given steps (lists of pairs): AdamW, global-norm
    clipping, LambdaLR with ``schedule_factor``. Returns each step's metrics (computed before its update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_factor)
    history = []
    for pairs in steps_pairs[:total_steps]:
        opt.zero_grad()
        loss, metrics = reference_step_loss(model, pairs, beta=beta, nll_on_prompt=nll_on_prompt, pad_id=pad_id)
        loss.backward()
        if max_grad_norm > 0:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        opt.step()
        sched.step()
        history.append(metrics)
    return history


def reference_router_aux(model, rows, pad_id: int) -> torch.Tensor:
    """The router's balancing loss of a step whose packed rows hold the pairs ``rows`` (one list per row):
    each row as the mixture-of-experts model's own ``ForCausalLM`` computes it, on a padded batch of the
    row's sequences with an attention mask (``output_router_logits=True``: its ``aux_loss``), weighted by
    the row's share of the step's real tokens."""
    losses, tokens = [], []
    for pairs in rows:
        ids, attn, _, _ = padded_batch(pairs, pad_id)
        losses.append(model(input_ids=ids, attention_mask=attn, use_cache=False, output_router_logits=True).aux_loss)
        tokens.append(int(attn.sum()))
    return sum(loss * n / sum(tokens) for loss, n in zip(losses, tokens, strict=True))


@torch.no_grad()
def smallest_routing_margin(model, rows, pad_id: int, top_k: int) -> float:
    """The smallest gap, over the real tokens of ``rows`` and every MoE layer, between a token's ``k``-th
    and ``k+1``-th router logits. Two runs that differ by round-off route every token alike only when
    this gap is well above that round-off; a near-tie can send a token to another expert in one of them."""
    smallest = float("inf")
    for pairs in rows:
        ids, attn, _, _ = padded_batch(pairs, pad_id)
        out = model(input_ids=ids, attention_mask=attn, use_cache=False, output_router_logits=True)
        real = attn.reshape(-1).bool()
        for logits in out.router_logits:  # [B * S, E] per layer
            ranked = logits.reshape(-1, logits.shape[-1])[real].topk(top_k + 1, dim=-1).values
            smallest = min(smallest, float((ranked[:, top_k - 1] - ranked[:, top_k]).min()))
    return smallest
