"""The training loss with logits only where there are labels, computed in chunks.

Why this exists: a causal LM's own loss computes logits at every position over the whole vocabulary
and upcasts them to float32 (ChatGLM-6B, micro-batch 16 × 128: 0.5 GB of bf16 logits plus about 2 GB
of float32 copies and softmax kept for backward), although only the answer tokens carry labels. Here
the model runs without its head (``logits_to_keep`` an empty tensor), and the head and the cross-entropy run on the
final hidden states of the labelled positions only, ``CHUNK_ROWS`` rows at a time. The loss is the
same mean cross-entropy over label tokens as transformers' causal-LM loss.

The model is called through its (possibly DDP- or FSDP-wrapped) forward, so gradient sync and
parameter gathering work as usual. The final hidden states come from a forward hook on the decoder
(``base_model``), not from ``output_hidden_states=True``: transformers 5.x records hidden states with
hooks that read a ContextVar inside every layer, which breaks each ``torch.compile``d layer into pieces.
Model types not known to compute ``logits = head(final hidden state)`` (Cohere's logit scale,
Granite's logit scaling, ...) take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel

# Each checked in tests/test_fast_paths.py against the model's own loss and gradients.
SUPPORTED_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "glm", "glm4", "chatglm"}
)
# 1,024 rows × 130,528 vocabulary = 0.5 GB per float32 copy of a chunk's logits.
CHUNK_ROWS = 1024


def causal_lm(model: nn.Module) -> PreTrainedModel | None:
    """The transformers model inside DDP, PEFT or P-Tuning wrappers (the first in module order)."""
    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def supports_label_loss(model: nn.Module) -> bool:
    lm = causal_lm(model)
    return (lm is not None and getattr(lm.config, "model_type", None) in SUPPORTED_MODEL_TYPES
            and lm.base_model is not lm)


def final_hidden_states(model: nn.Module, lm: PreTrainedModel, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """Run ``model`` (``lm`` or a wrapper of it) and return what its decoder hands to the LM head:
    the first output of ``lm.base_model`` (after the final norm, for transformers and ChatGLM models).
    ``inputs``: more model inputs (``position_ids`` of packed rows)."""
    captured = []
    hook = lm.base_model.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        # No position for the model's own head: with logits_to_keep=1 it ran on the strided last-position view
        # as an aten::bmm taking 4 ms a step at micro-batch 16 (H200, run 17's profile: about one read of the
        # head's weights per row, ~4% of a LoRA step), for logits nobody reads.
        model(input_ids=input_ids, use_cache=False, logits_to_keep=input_ids.new_empty(0), **inputs)
    finally:
        hook.remove()
    return captured[0]


def label_rows(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``[batch × length]``) of the positions whose next token has a label.

    Position t predicts token t + 1, so the labels shift left, as in transformers' loss. Computed on
    the CPU batch by the training loop: ``nonzero()`` on a device tensor waits for the device.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
    return (targets != -100).nonzero().squeeze(1)


def label_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Mean float32 cross-entropy over the label tokens (see ``label_loss_sum``)."""
    rows = label_rows(labels)
    return label_loss_sum(model, input_ids, labels, rows, chunk_rows) / max(rows.numel(), 1)


def label_loss_sum(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None,
                   chunk_rows: int = CHUNK_ROWS, **inputs) -> torch.Tensor:
    """Float32 cross-entropy summed over the positions whose next token has a label (not -100).

    ``model`` is what the training loop steps (a causal LM, possibly wrapped); call it under the
    training autocast. ``rows`` are ``label_rows(labels)``, found before the batch moved to the device
    (otherwise found here, which synchronizes). With more label rows than one chunk, each chunk is
    recomputed in backward (``torch.utils.checkpoint``), so only one chunk's logits exist at a time; a
    single chunk is kept, since recomputing it could not lower the peak (backward starts right after it).
    """
    if rows is None:
        rows = label_rows(labels)
    rows = rows.to(labels.device, non_blocking=True)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).flatten().index_select(0, rows)
    lm = causal_lm(model)
    hidden = final_hidden_states(model, lm, input_ids, **inputs).flatten(0, 1)
    if rows.numel() == 0:
        return hidden.sum() * 0.0  # nothing to learn here, but DDP still needs a backward through the model
    hidden = hidden.index_select(0, rows)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)

    def chunk_loss(hidden_chunk: torch.Tensor, target_chunk: torch.Tensor) -> torch.Tensor:
        logits = head(hidden_chunk)
        if softcap is not None:  # Gemma 2/3, in the same dtype and order as their forward
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), target_chunk, reduction="sum")

    recompute = torch.is_grad_enabled() and rows.numel() > chunk_rows
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.numel(), chunk_rows):
        chunk = (hidden[start : start + chunk_rows], targets[start : start + chunk_rows])
        if recompute:
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, *chunk, use_reentrant=False)
        else:
            total = total + chunk_loss(*chunk)
    return total
