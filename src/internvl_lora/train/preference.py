"""The preference objective (train.objective=mpo): the official MPO loss, trained with LoRA.

For each pair i with policy log-probabilities pc, pr (chosen, rejected; summed over the answer's tokens)
and reference log-probabilities rc, rr (the same model with the adapters disabled: no second copy):

    sigmoid_i  = -log sigmoid(beta * ((pc - pr) - (rc - rr)))                       (DPO)
    bco_pair_i = -log sigmoid(beta * (pc - rc) - delta) - log sigmoid(-(beta * (pr - rr) - delta))
    sft_i      = -pc / (trained tokens of the chosen answer)                        (token-mean NLL)
    loss       = mean over the pairs of the global batch of
                 sigmoid_weight * sigmoid_i + bco_pair_weight * bco_pair_i + sft_weight * sft_i

`delta` is the running mean of the rewards beta * (p - r) of every chosen and rejected answer trained
so far, over all processes, updated before each micro-batch's loss (the official trainer's
`RunningMoments`); it is saved with every checkpoint and restored on resume. The official recipe
trains one pair per device and micro-batch, so its per-micro-batch means are per-pair terms
averaged over the global batch: what this normalisation gives for any packing or batch size.

Differences from the official trainer (docs/preference.md): evaluation does not move `delta` (the
official one updates it on evaluation batches too), and each pair's tiles are encoded once for both
answers (the official code encodes them twice).

Generic: the model-specific part (embedding with shared tiles) comes from `internvl.embed`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..data.collate import trained_positions
from ..internvl.constants import IGNORE_INDEX
from ..internvl.embed import embed_with_tiles, vision_is_trained

PREFERENCE_STATE = "PreferenceState"  # its name in trainer_state.json's stateful_callbacks


@dataclass
class PairTerms:
    """Per-pair values of one micro-batch (1-D tensors of the pairs), all but `loss` detached."""

    loss: torch.Tensor  # the weighted per-pair loss (with gradient)
    sigmoid: torch.Tensor
    bco_pair: torch.Tensor
    sft: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def pair_terms(pc, pr, rc, rr, chosen_tokens, delta, beta: float, sigmoid_weight: float,
               bco_pair_weight: float, sft_weight: float) -> PairTerms:
    """The MPO terms of each pair (see the module docstring); `delta` the BCO running mean to use."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    sigmoid = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    bco = -F.logsigmoid(beta * chosen_ratio - delta) - F.logsigmoid(-(beta * rejected_ratio - delta))
    sft = -pc / chosen_tokens.clamp(min=1)
    loss = sigmoid_weight * sigmoid + bco_pair_weight * bco + sft_weight * sft
    d = lambda t: t.detach()  # noqa: E731
    return PairTerms(loss, d(sigmoid), d(bco), d(sft), d(beta * chosen_ratio), d(beta * rejected_ratio), d(pc), d(pr))


class RunningMean:
    """The mean of every value passed to `update` so far, over all processes (BCO pair's delta).

    Kept as device tensors (no host synchronization per step); `state` / `load_state` for checkpoints."""

    def __init__(self):
        self.total: torch.Tensor | float = 0.0
        self.count: torch.Tensor | float = 0.0

    def update(self, values: torch.Tensor) -> torch.Tensor:
        s = torch.stack([values.detach().double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                        device=values.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(s)
        self.total = self.total + s[0]
        self.count = self.count + s[1]
        return self.mean(values.device)

    def mean(self, device=None) -> torch.Tensor:
        if not isinstance(self.count, torch.Tensor) and self.count == 0:
            return torch.zeros((), device=device)
        total = torch.as_tensor(self.total, dtype=torch.float64, device=device)
        return (total / torch.as_tensor(self.count, dtype=torch.float64, device=device)).float()

    def state(self) -> dict:
        return {"total": float(self.total), "count": float(self.count)}

    def load_state(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), float(state["count"])


class PreferenceState(TrainerCallback, ExportableState):
    """Puts the BCO running mean into every checkpoint's trainer_state.json (written last, so a
    checkpoint is complete only with it); `restore` reads it back when resuming."""

    def __init__(self, running: RunningMean):
        self.running = running

    def state(self) -> dict:
        return {"args": {}, "attributes": self.running.state()}

    def restore(self, checkpoint) -> bool:
        """Load the running mean saved in `checkpoint`; False when that checkpoint has none."""
        from pathlib import Path

        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("stateful_callbacks", {})
        entry = saved.get(PREFERENCE_STATE)
        if isinstance(entry, list):
            entry = entry[-1] if entry else None
        if not entry:
            return False
        self.running.load_state(entry["attributes"])
        return True


def sequence_logps(model, embeds: torch.Tensor | None, inputs: dict, labels: torch.Tensor, keep=None):
    """Sum of log-probabilities of the trained tokens of each sequence and their number.

    Sequences are the rows of a padded batch, or the segments (`cu_seq_lens_q`) of a packed row. Logits
    are formed only at positions whose next token is trained (`logits_to_keep`). `embeds` None: the
    model embeds `input_ids` and `pixel_values` itself."""
    if keep is None:
        keep = trained_positions(labels)
    keep = keep.to(labels.device)
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    model_inputs = {k: v for k, v in inputs.items() if k in _MODEL_KEYS}
    if embeds is None:
        model_inputs.update(input_ids=inputs["input_ids"], pixel_values=inputs.get("pixel_values"))
    else:
        model_inputs["inputs_embeds"] = embeds
    logits = model(use_cache=False, logits_to_keep=keep, **model_inputs).logits
    target = shifted[:, keep]  # (rows, kept)
    valid = target != IGNORE_INDEX
    logits = logits.float()
    picked = logits.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(valid, picked - torch.logsumexp(logits, dim=-1), torch.zeros_like(picked))
    cu = inputs.get("cu_seq_lens_q")
    if cu is None:  # padded: one sequence per row
        return token_logps.sum(-1), valid.sum(-1)
    cu = cu.to(labels.device).long()
    segment = torch.bucketize(keep, cu[1:], right=True)  # position p predicts p + 1, in p's segment
    n = len(cu) - 1
    sums = torch.zeros(n, device=labels.device, dtype=token_logps.dtype).index_add_(0, segment, token_logps[0])
    counts = torch.zeros(n, device=labels.device, dtype=torch.long).index_add_(0, segment, valid[0].long())
    return sums, counts


_MODEL_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference model: the same model with its PEFT adapters (and modules_to_save) switched off."""
    inner = model
    while not hasattr(inner, "disable_adapter") and hasattr(inner, "module"):  # DDP and other wrappers
        inner = inner.module
    if not hasattr(inner, "disable_adapter"):
        raise TypeError("the preference objective needs a PEFT model (its reference is the model with the "
                        "adapters disabled)")
    with inner.disable_adapter():
        yield


class PreferenceObjective:
    """Computes the MPO loss of a micro-batch of pairs (`collate.PreferenceCollator`) and keeps the
    metrics of the logging interval (`pop_metrics`).

    `shared_tiles` (the default): a pair's tiles are encoded once for both answers (`embed_with_tiles`),
    outside the model's forward. Off under sharded weights (FSDP, ZeRO-3), where a module's weights are
    gathered only inside the wrapped model's forward: the batch then carries each answer's tiles
    (`PreferenceCollator(expand_tiles=True)`, blank tile included) and the model's own forward embeds
    them -- each tile encoded twice per forward, as in the official trainer."""

    def __init__(self, model, beta: float, sigmoid_weight: float, bco_pair_weight: float, sft_weight: float,
                 dummy_vision: bool = False, shared_tiles: bool = True):
        self.beta, self.weights = beta, (sigmoid_weight, bco_pair_weight, sft_weight)
        self.dummy_vision, self.shared_tiles = dummy_vision, shared_tiles
        self.running = RunningMean()
        self.separate_reference_vision = vision_is_trained(model)
        self._sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._pairs: dict[str, int] = {"train": 0, "eval": 0}

    def _reference_logps(self, model, inputs, labels, keep, features):
        with torch.no_grad():
            if not self.shared_tiles:
                with adapters_disabled(model):
                    return sequence_logps(model, None, inputs, labels, keep)
            if self.separate_reference_vision:  # a trained vision part: the reference has its own features
                with adapters_disabled(model):
                    embeds, _ = embed_with_tiles(model, inputs["input_ids"], inputs.get("pixel_values"),
                                                 inputs.get("tile_index"), self.dummy_vision)
                    return sequence_logps(model, embeds, inputs, labels, keep)
            embeds, _ = embed_with_tiles(model, inputs["input_ids"], None, inputs.get("tile_index"), self.dummy_vision,
                                         features=features)
            with adapters_disabled(model):
                return sequence_logps(model, embeds, inputs, labels, keep)

    def __call__(self, model, inputs: dict, normaliser=None) -> torch.Tensor:
        """The summed per-pair loss divided by `normaliser` (the pairs of the global batch; this micro-batch's
        own pairs when None). Sequences alternate chosen, rejected (the collator's order)."""
        labels, keep = inputs["labels"], inputs.get("trained_positions")
        training = model.training
        embeds = features = None
        if self.shared_tiles:
            embeds, features = embed_with_tiles(model, inputs["input_ids"], inputs.get("pixel_values"),
                                                inputs.get("tile_index"), self.dummy_vision)
        rc_rr, _ = self._reference_logps(model, inputs, labels, keep,
                                         None if features is None else features.detach())
        logps, counts = sequence_logps(model, embeds, inputs, labels, keep)
        n = 2 * int(inputs.get("pairs", len(logps) // 2))  # a packed blank-tile block is a segment of its own
        logps, counts, rc_rr = logps[:n], counts[:n], rc_rr[:n]
        pc, pr, rc, rr = logps[0::2], logps[1::2], rc_rr[0::2], rc_rr[1::2]
        rewards = torch.cat([self.beta * (pc - rc), self.beta * (pr - rr)]).detach()
        # Training: delta includes this micro-batch (the official update-then-use); evaluation reads it only.
        delta = self.running.update(rewards.reshape(2, -1).mean(0)) if training else \
            self.running.mean(rewards.device)
        terms = pair_terms(pc, pr, rc, rr, counts[0::2], delta, self.beta, *self.weights)
        self._record("train" if training else "eval", terms, delta)
        denom = normaliser if normaliser is not None else terms.loss.numel()
        if isinstance(denom, torch.Tensor):
            denom = denom.to(terms.loss.device)
        return terms.loss.sum() / denom

    # -- metrics ------------------------------------------------------------------------------------
    def _record(self, split: str, t: PairTerms, delta: torch.Tensor) -> None:
        values = {
            "rewards/accuracy": (t.chosen_rewards > t.rejected_rewards).float(),
            "rewards/margin": t.chosen_rewards - t.rejected_rewards,
            "rewards/chosen": t.chosen_rewards, "rewards/rejected": t.rejected_rewards,
            "logps/chosen": t.chosen_logps, "logps/rejected": t.rejected_logps,
            "loss/sigmoid": t.sigmoid, "loss/bco_pair": t.bco_pair, "loss/sft": t.sft,
        }
        sums = self._sums[split]
        for k, v in values.items():
            sums[k] = sums.get(k, 0) + v.sum()
        sums["bco_delta"] = delta.detach() * t.loss.numel() + sums.get("bco_delta", 0)
        self._pairs[split] += t.loss.numel()

    def pop_metrics(self, split: str) -> dict[str, float]:
        """Means over the pairs since the last call (all processes), then reset; {} when none."""
        sums, pairs = self._sums[split], self._pairs[split]
        self._sums[split], self._pairs[split] = {}, 0
        if not sums:
            return {}
        keys = sorted(sums)
        device = next(v.device for v in sums.values() if isinstance(v, torch.Tensor))
        packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys]
                             + [torch.tensor(float(pairs), dtype=torch.float64, device=device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        values = packed.tolist()
        n = max(values[-1], 1.0)
        prefix = "eval_" if split == "eval" else ""
        return {prefix + k: v / n for k, v in zip(keys, values[:-1])}
