"""The training loss over the vocabulary, computed a few rows at a time on a CPU.

    loss = Σ_k  logsumexp(logits_k) − logits_k[target_k]        (K rows, V classes)
    d loss / d logits_k = softmax(logits_k) − onehot(target_k)

`F.cross_entropy(logits.float(), targets)` makes whole (K, V) passes: the cast to fp32, the
log-softmax (kept for backward), in backward a zero-filled gradient, the log-softmax's
backward and the cast back to the head's dtype. With the default model's 49,152-token
vocabulary that is ~200 MB a pass for 1,024 tokens, and on a 2-core Xeon with AMX it took
about a fifth of a whole bf16 train step of the frozen base (docs/benchmarks.md §8). Here
the logits are read once in forward (only each row's log-sum-exp is kept) and once in
backward, in row chunks of a few MB that the fp32 work reuses from the cache; the gradient
is written once, in the logits' dtype. The values are those of the fp32 (fp64 for fp64
logits) cross-entropy; tests/test_cross_entropy.py checks them against it.

CPU only, where it is measured to pay (benchmarks/bench_cross_entropy.py); on other devices
`cross_entropy_sum` runs F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEVICES = ("cpu",)
CHUNK_BYTES = 4 << 20  # one fp32 chunk: rows x V x 4 bytes ≈ a core's L2 (benchmarked 1-16 MB)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_k −log softmax(logits_k)[targets_k] in fp32 (or wider): what
    F.cross_entropy(logits.float(), targets, reduction="sum") returns. logits (K, V) in any
    float dtype, targets (K,) class indices; the gradient comes back in logits' dtype."""
    if logits.device.type not in DEVICES:
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    rows = max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    return ChunkedCrossEntropy.apply(logits, targets, rows)


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of logits (K, V) against targets (K,), `rows` rows at a time."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        wide = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=wide, device=logits.device)  # (K,)
        with torch.autocast(logits.device.type, enabled=False):  # full SFT runs under autocast
            for start in range(0, logits.shape[0], rows):
                chunk = logits[start:start + rows].to(wide)  # (R, V)
                torch.logsumexp(chunk, dim=-1, out=lse[start:start + rows])  # (R,)
            picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1).to(wide)  # (K,)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return (lse - picked).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        vocab, rows = logits.shape[1], ctx.rows
        grad = torch.empty_like(logits)  # (K, V), in the logits' dtype
        for start in range(0, logits.shape[0], rows):
            stop = min(start + rows, logits.shape[0])
            chunk = logits[start:stop].to(lse.dtype, copy=True)  # (R, V)
            chunk.sub_(lse[start:stop, None]).exp_()  # softmax, (R, V)
            # − onehot(target): the flat position of each row's target
            hits = torch.arange(stop - start, device=chunk.device) * vocab + targets[start:stop]
            chunk.view(-1)[hits] -= 1
            grad[start:stop] = chunk.mul_(grad_total)
        return grad, None, None
