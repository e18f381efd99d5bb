"""Preference tuning (``--stage dpo``): DPO (sigmoid), IPO, ORPO and SimPO on chosen/rejected pairs.

The formulas are TRL's (``DPOTrainer.dpo_loss`` for sigmoid and ipo, ``CPOTrainer`` for simpo,
``ORPOTrainer.odds_ratio_loss``) as LLaMA-Factory combines them: DPO sums the answer tokens'
log-probabilities; IPO, ORPO and SimPO average them over the answer tokens; ORPO adds the chosen
answer's negative mean log-likelihood; ORPO and SimPO need no reference model. ``tests/test_dpo.py``
checks each against the published formula written out.

The reference model of DPO/IPO is the base under the adapter with the adapter switched off (LoRA,
P-Tuning v2: no second copy), a frozen copy (freeze, full), or log-probabilities computed once
before training (``--precompute_ref_logps``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from glmtune.data.preference import PreferenceExample
from glmtune.data.preprocess import IGNORE_INDEX, collate
from glmtune.errors import GlmtuneError
from glmtune.train.loss import CHUNK_ROWS, causal_lm, final_hidden_states, label_rows, supports_label_loss

REFERENCE_FREE = ("orpo", "simpo")
AVERAGED = ("ipo", "orpo", "simpo")

# (model being trained, input_ids, labels, label rows or None) -> the reference model's summed answer
# log-probabilities per row.
Reference = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def answer_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None = None,
                 chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the float32 sum of log p(label token) over its labelled positions, and their count.

    As ``train.loss.label_loss_sum``: where the model type allows, the LM head runs only on the labelled
    positions' final hidden states, chunk by chunk (recomputed in backward), not on every position.
    ``rows`` are ``label_rows(labels)`` found on the CPU batch (otherwise found here, which synchronizes).
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    mask = targets != IGNORE_INDEX
    counts = mask.sum(-1)
    if not supports_label_loss(model):
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (token_logps * mask).sum(-1), counts
    rows = (label_rows(labels) if rows is None else rows).to(labels.device, non_blocking=True)
    flat_targets = targets.flatten()[rows]
    lm = causal_lm(model)
    hidden = final_hidden_states(model, lm, input_ids).flatten(0, 1).index_select(0, rows)
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)

    def chunk_logps(hidden_chunk: torch.Tensor, target_chunk: torch.Tensor) -> torch.Tensor:
        logits = head(hidden_chunk)
        if softcap is not None:  # Gemma 2/3, as their forward does it
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float().log_softmax(-1).gather(-1, target_chunk.unsqueeze(-1)).squeeze(-1)

    recompute = torch.is_grad_enabled() and rows.numel() > chunk_rows
    pieces = []
    for start in range(0, rows.numel(), chunk_rows):
        chunk = (hidden[start : start + chunk_rows], flat_targets[start : start + chunk_rows])
        pieces.append(torch.utils.checkpoint.checkpoint(chunk_logps, *chunk, use_reentrant=False)
                      if recompute else chunk_logps(*chunk))
    token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    sums = token_logps.new_zeros(input_ids.shape[0]).index_add(0, rows // input_ids.shape[1], token_logps)
    if rows.numel() == 0:
        sums = sums + hidden.sum() * 0.0  # keep the graph connected for DDP
    return sums, counts


def preference_loss(loss_type: str, beta: float, gamma: float, chosen: torch.Tensor, rejected: torch.Tensor,
                    reference_chosen: torch.Tensor | None = None, reference_rejected: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and (detached) chosen and rejected rewards from the policy's (and reference's)
    answer log-probabilities: sums for sigmoid, per-token means for ipo, orpo and simpo."""
    if loss_type in ("sigmoid", "ipo"):
        chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
        logits = chosen_ratio - rejected_ratio
        losses = -F.logsigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    if loss_type == "orpo":
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        losses = -chosen - beta * F.logsigmoid(log_odds)
    elif loss_type == "simpo":
        losses = -F.logsigmoid(beta * ((chosen - rejected) - gamma / beta))
    else:
        raise GlmtuneError(f"unknown --pref_loss {loss_type}")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def adapter_off_reference(base_view) -> Reference:
    """The reference is the trained model with its adapter switched off (``Method.base_view``)."""
    from glmtune.train.distributed import unwrap

    def reference(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, rows=None) -> torch.Tensor:
        with torch.no_grad(), base_view(unwrap(model)) as base:
            return answer_logps(base, input_ids, labels, rows)[0]

    return reference


def frozen_copy_reference(copy: nn.Module) -> Reference:
    copy.requires_grad_(False).eval()

    def reference(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, rows=None) -> torch.Tensor:
        with torch.no_grad():
            return answer_logps(copy, input_ids, labels, rows)[0]

    return reference


class DPOObjective:
    """Batches of pairs: the chosen answers in the first half of the rows, the rejected in the second."""

    name = "dpo"

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, gamma: float = 0.5,
                 reference: Reference | None = None):
        if beta <= 0:
            raise GlmtuneError(f"--pref_beta must be positive, got {beta}")
        self.loss_type, self.beta, self.gamma, self.reference = loss_type, beta, gamma, reference

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    def length(self, example: PreferenceExample) -> int:
        return max(len(example.chosen.input_ids), len(example.rejected.input_ids))

    def collate(self, examples: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
        batch["label_rows"] = label_rows(batch["labels"])  # on the CPU: no device sync in the loss
        if self.needs_reference and all(e.reference_logps is not None for e in examples):
            batch["reference_logps"] = torch.tensor([e.reference_logps[0] for e in examples]
                                                    + [e.reference_logps[1] for e in examples])
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        input_ids, labels, rows = batch["input_ids"], batch["labels"], batch.get("label_rows")
        logps, counts = answer_logps(model, input_ids, labels, rows)
        reference = None
        if self.needs_reference:
            reference = batch.get("reference_logps")
            if reference is None:
                if self.reference is None:
                    raise GlmtuneError("--stage dpo: no reference model (use --precompute_ref_logps)")
                reference = self.reference(model, input_ids, labels, rows)
        if self.loss_type in AVERAGED:
            logps = logps / counts.clamp(min=1)
            reference = reference / counts.clamp(min=1) if reference is not None else None
        chosen, rejected = logps.chunk(2)
        reference_chosen, reference_rejected = reference.chunk(2) if reference is not None else (None, None)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            self.loss_type, self.beta, self.gamma, chosen, rejected, reference_chosen, reference_rejected)
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return losses.sum(), metrics

    @torch.no_grad()
    def precompute_reference(self, model: nn.Module, examples: list[PreferenceExample], pad_id: int,
                             batch_size: int, autocast) -> None:
        """Store the reference log-probabilities in ``examples`` (``--precompute_ref_logps``)."""
        if not self.needs_reference:
            return
        if self.reference is None:
            raise GlmtuneError("--precompute_ref_logps: no reference model to compute them with")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        for start in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", unit="batch"):
            chunk = examples[start : start + batch_size]
            batch = collate([e.chosen for e in chunk] + [e.rejected for e in chunk], pad_id)
            with autocast:
                logps = self.reference(model, batch["input_ids"].to(device), batch["labels"].to(device), None).cpu()
            for index, example in enumerate(chunk):
                example.reference_logps = (float(logps[index]), float(logps[len(chunk) + index]))
        model.train(was_training)


@torch.no_grad()
def preference_metrics(model: nn.Module, objective: DPOObjective, examples: list[PreferenceExample], pad_id: int,
                       batch_size: int = 8) -> dict[str, float]:
    """Loss and reward metrics averaged over ``examples`` (held-out pairs), the model in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    for start in range(0, len(examples), batch_size):
        batch = objective.collate(examples[start : start + batch_size], pad_id)
        loss, metrics = objective.loss(model, {k: v.to(device) for k, v in batch.items()})
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    model.train(was_training)
    return {name: value / len(examples) for name, value in totals.items()}


def policy_reference() -> Reference:
    """The model being trained as its own reference: only before its first step (precomputing)."""

    def reference(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, rows=None) -> torch.Tensor:
        with torch.no_grad():
            return answer_logps(model, input_ids, labels, rows)[0]

    return reference
