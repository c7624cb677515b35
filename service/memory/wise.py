"""Training a side memory (WISE, Wang et al. 2024): the edit job's model work, on transformers.

A memory version is ΔW (side copy of one layer's `down_proj` minus the main weight) and a threshold ε
(service/memory/side_memory.py). The next version is trained from its parent's ΔW on the new batch of
edits, the memory's earlier edits replayed (WISE's replay, its Appendix B.3), and irrelevant texts:

- each edit is trained after short random contexts the base writes itself (WISE's context templates,
  as in ROME), so the memory answers the fact wherever it is asked, not only after BOS;
- the side output is added where the answer is produced (from the prompt's last token to the answer's
  second-to-last), and the main output everywhere else, exactly as the per-token router will serve it;
- cross-entropy on each edit's answer tokens;
- WISE's activation margins on ‖ΔW·h‖: at least `beta` on answer positions, at most `alpha` on every
  position of the irrelevant texts and on the edit prompts' other positions;
- masked updates: only a random share `mask_density` of ΔW's entries changes in one version (WISE's
  knowledge shard: batches write mostly apart, so a new batch overwrites little of the earlier ones);
- WISE's element-wise norm constraint: |ΔW| ≤ `norm_constraint`;
- the same quiet margin on texts as the memory's tenants are served them, under their LoRA patches
  (`quiet_inputs`): a patch moves the router's input h, and a memory trained on the bare base alone spoke
  on patched task prompts (at T = 100 on the kit the reverse alias kept 39–50 % of its answers); and on every
  irrelevant text's inputs on the bare base in every step, not only on the few sampled as negatives.

Training stops early once every edit (new and replayed) is answered by the side memory and its margin
holds. The threshold is then set between what irrelevant texts and edit prompts give (`threshold`).
Margins are relative to the layer's own output size (the median ‖W·h‖ over the irrelevant texts), so the
defaults carry from the kit's 128-wide model to a 4096-wide one.

Parents are never merged into the new shard by TIES: a version is trained against its parent's ΔW
present in the forward pass, so ΔW_parent + shard is what the training saw; trimming or sign election
of either would undo what the new shard learned to compensate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from service.memory.hf_hook import decoder_layers


@dataclass(frozen=True)
class Edit:
    """A fact to write: the prompt and the answer it must get."""

    prompt: str
    target: str


@dataclass(frozen=True)
class WiseConfig:
    # At most; stops once every edit is answered with its margin (on the kit it never does: the quiet margin
    # is never met everywhere, so every version trains this long — 600 against 300 kept more edits at T = 100).
    steps: int = 600
    # Adam on ΔW: WISE's SGD at lr 1.0 suits LLaMA's gradient scale, not every model's. Adam moves every
    # entry by about lr per step, so lr stays well below the weights' own size or a parent is wrecked.
    lr: float = 0.01
    mask_density: float = 1.0  # ρ: share of ΔW one version may change (WISE: 0.2; replay keeps old edits here)
    alpha: float = 0.1  # irrelevant positions: ‖ΔW·h‖ ≤ alpha × the layer's median output norm
    beta: float = 1.0  # answer positions: ‖ΔW·h‖ ≥ beta × the layer's median output norm
    norm_constraint: float = 1.0  # |ΔW| element-wise bound
    replay: int = 48  # earlier edits replayed per step (16 lost edits beyond T = 50: Rel 0.89 at T = 100)
    negatives: int = 16  # irrelevant texts per step
    # Weight of the quiet margin against the answers' cross-entropy. Few quiet positions break the margin, so
    # their mean is small beside the answers' loss: at weight 1 the memory spoke on 1 % of its own irrelevant
    # positions at T = 10 and on the bare base's answers to held-out task prompts from T = 50 on (served Loc
    # 0.78, probe perplexity 1.09 at T = 100); at 10 (with the two lines above) Loc 0.93, perplexity 1.04.
    quiet_weight: float = 10.0
    check_every: int = 10  # steps between early-stop checks
    contexts: tuple[tuple[int, int], ...] = ()  # (tokens, how many) of random contexts (WISE: (5, 5), (10, 5))
    seed: int = 0


@dataclass
class Trained:
    delta: torch.Tensor  # ΔW of the new version: (hidden, intermediate)
    threshold: float  # ε
    steps: int
    stats: dict = field(default_factory=dict)  # margins measured after training (what ε was chosen between)


@dataclass
class _Rows:
    ids: torch.Tensor  # (batch, length), right-padded
    real: torch.Tensor  # (batch, length) bool: a real token, not padding
    answer: torch.Tensor  # (batch, length) bool: a position that produces an answer token (side output there)
    labels: torch.Tensor  # (batch, length): next-token labels at answer positions, -100 elsewhere


def _rows(tok, edits: Sequence[Edit], texts: Sequence[str], contexts: Sequence[str] = ()) -> _Rows:
    """Edits (each after its context, "" for none) and irrelevant texts as one right-padded batch."""
    encoded = []
    contexts = list(contexts) or [""] * len(edits)
    for e, context in zip(edits, contexts):
        text = f"{context}. {e.prompt}" if context else e.prompt
        prompt = tok(text)["input_ids"]
        answer = tok(e.target, add_special_tokens=False)["input_ids"]
        encoded.append((prompt + answer, len(prompt), answer))
    for t in texts:
        encoded.append((tok(t)["input_ids"], None, None))
    length = max(len(x[0]) for x in encoded)
    n = len(encoded)
    ids = torch.full((n, length), tok.pad_token_id)
    real = torch.zeros(n, length, dtype=torch.bool)
    answer_at = torch.zeros(n, length, dtype=torch.bool)
    labels = torch.full((n, length), -100)
    for row, (seq, prompt_len, answer) in enumerate(encoded):
        ids[row, : len(seq)] = torch.tensor(seq)
        real[row, : len(seq)] = True
        if prompt_len is not None:
            # Position p predicts token p+1: the answer's tokens are predicted from prompt_len-1 on.
            span = slice(prompt_len - 1, prompt_len - 1 + len(answer))
            answer_at[row, span] = True
            labels[row, span] = torch.tensor(answer)
    return _Rows(ids, real, answer_at, labels)


class _TrainingHook:
    """While training: side output added at answer positions, ‖ΔW·h‖ kept for the margins."""

    def __init__(self, model: nn.Module, layer: int, delta: torch.Tensor):
        mlp = decoder_layers(model)[layer].mlp
        down = mlp.down_proj
        down = getattr(down, "base_layer", down)
        self.delta = delta
        self.answer: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.main_norms: torch.Tensor | None = None
        self._h = None
        self._handles = [down.register_forward_pre_hook(self._keep), mlp.register_forward_hook(self._add)]

    def _keep(self, _module, args) -> None:
        self._h = args[0]

    def _add(self, _module, _args, out: torch.Tensor) -> torch.Tensor:
        d = self._h @ self.delta.T
        self.norms = torch.linalg.vector_norm(d, dim=-1)
        self.main_norms = torch.linalg.vector_norm(out.detach(), dim=-1)
        if self.answer is None:
            return out
        return out + d * self.answer.unsqueeze(-1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _forward(model, hook: _TrainingHook, rows: _Rows, with_side: bool = True):
    hook.answer = rows.answer.to(hook.delta.dtype) if with_side else None
    out = model(input_ids=rows.ids, attention_mask=rows.real.long())
    return out.logits, hook.norms, hook.main_norms


def _answered(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Per row: every answer token is the argmax (rows without answer positions count as answered)."""
    wrong = (logits.argmax(-1) != rows.labels) & rows.answer
    return ~wrong.any(dim=1)


def train_memory(model: nn.Module, tok, layer: int, parent: torch.Tensor | None, edits: Sequence[Edit],
                 replay: Sequence[Edit], irrelevant: Sequence[str], config: WiseConfig = WiseConfig(),
                 progress: Callable[[float, str], None] = lambda p, s: None,
                 always_quiet: Sequence[str] = (), quiet_inputs: Sequence[torch.Tensor] = ()) -> Trained:
    """The next memory version: ΔW trained from `parent` on `edits`, keeping `replay`, away from `irrelevant`.

    `always_quiet`: texts that are among the negatives of every step, not sampled (a revoked edit's prompts).
    `quiet_inputs`: sets of router inputs (rows of h, from `down_inputs`) the memory must stay quiet on too, every
    step; each set's margin is its own mean, so a large set does not dilute a small one's few violations.
    """
    if not edits and not replay:
        raise ValueError("a memory version needs at least one edit")
    if not irrelevant:
        raise ValueError("training a memory needs irrelevant texts (the margins' other side)")
    for p in model.parameters():
        p.requires_grad_(False)
    down = decoder_layers(model)[layer].mlp.down_proj
    down = getattr(down, "base_layer", down)
    shape = (down.out_features, down.in_features)
    start = parent.clone().float() if parent is not None else torch.zeros(shape)
    delta = start.clone().requires_grad_(True)
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    mask = (torch.rand(shape, generator=gen) < config.mask_density).float()
    sets = [inputs for inputs in quiet_inputs if inputs is not None and len(inputs)]
    held = torch.cat(sets) if sets else None
    hook = _TrainingHook(model, layer, delta)
    was_training = model.training
    model.eval()  # no dropout: the forward pass is the one served
    try:
        with torch.no_grad():
            scale = _output_scale(model, hook, tok, irrelevant)
        alpha, beta = config.alpha * scale, config.beta * scale
        contexts = [""] + context_texts(model, tok, config.contexts, config.seed)
        opt = torch.optim.Adam([delta], lr=config.lr)
        everything = list(edits) + list(replay)
        steps = 0
        for step in range(config.steps):
            batch_edits = list(edits) + rng.sample(list(replay), min(config.replay, len(replay)))
            negatives = list(always_quiet) + rng.sample(list(irrelevant), min(config.negatives, len(irrelevant)))
            rows = _rows(tok, batch_edits, negatives, [rng.choice(contexts) for _ in batch_edits])
            logits, norms, _ = _forward(model, hook, rows)
            ce = nn.functional.cross_entropy(logits[rows.answer], rows.labels[rows.answer])
            quiet = rows.real & ~rows.answer
            loud = torch.relu(beta - norms[rows.answer]).mean() / scale
            hush = torch.relu(norms[quiet] - alpha).mean() / scale
            for inputs in sets:  # each set its own mean
                hush = hush + torch.relu(torch.linalg.vector_norm(inputs @ delta.T, dim=-1) - alpha).mean() / scale
            loss = ce + loud + config.quiet_weight * hush
            opt.zero_grad()
            loss.backward()
            delta.grad *= mask
            opt.step()
            with torch.no_grad():
                # WISE's norm constraint, and only the shard's entries move away from the parent.
                delta.copy_(torch.where(mask.bool(), delta.clamp(-config.norm_constraint, config.norm_constraint),
                                        start))
            steps = step + 1
            progress(steps / config.steps, f"training step {steps}: answers {ce.item():.3f}, "
                                           f"margins {loud.item():.3f} in / {hush.item():.3f} out")
            if steps % config.check_every == 0 and _all_answered(model, hook, tok, everything, irrelevant, alpha,
                                                                 beta, held):
                break
        with torch.no_grad():
            stats = _margins(model, hook, tok, everything, irrelevant, held)
    finally:
        hook.remove()
        model.train(was_training)
    threshold = _threshold(stats)
    stats.update(scale=scale, alpha=alpha, beta=beta, threshold=threshold)
    return Trained(delta=delta.detach().clone(), threshold=threshold, steps=steps, stats=stats)


@torch.no_grad()
def down_inputs(model: nn.Module, tok, layer: int, texts: Sequence[str]) -> torch.Tensor:
    """h, the input of layer `layer`'s `down_proj`, at every real token of `texts` (one row per token).

    This is what the router reads. For a text the memory must stay quiet on it is a constant of training:
    layer L's input comes from the layers below, which the memory never touches, and the memory adds
    nothing at such a text's positions. So texts served under a LoRA patch are read once, with the patch
    loaded (`model` a PeftModel), and a training step needs only ΔW·h on them.
    """
    down = decoder_layers(model)[layer].mlp.down_proj
    down = getattr(down, "base_layer", down)
    seen: list[torch.Tensor] = []
    handle = down.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    out = [torch.zeros(0, down.in_features)]
    try:
        for i in range(0, len(texts), 64):
            seen.clear()
            rows = _rows(tok, [], list(texts[i : i + 64]))
            model(input_ids=rows.ids, attention_mask=rows.real.long())
            out.append(seen[-1][rows.real].float())
    finally:
        handle.remove()
    return torch.cat(out)


def _held_max(held: torch.Tensor | None, delta: torch.Tensor) -> float:
    """The largest ‖ΔW·h‖ over held router inputs (0 with none)."""
    if held is None:
        return 0.0
    return float(torch.linalg.vector_norm(held @ delta.T, dim=-1).max())


@torch.no_grad()
def context_texts(model, tok, shapes: Sequence[tuple[int, int]], seed: int) -> list[str]:
    """Short texts the model writes from nothing (sampled, seeded): contexts to train edits after."""
    torch.manual_seed(seed)
    texts = []
    for length, count in shapes:
        start = torch.full((count, 1), tok.bos_token_id)
        out = model.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=True, top_k=5,
                             max_new_tokens=length, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for row in out[:, 1:]:
            text = tok.decode(row, skip_special_tokens=True).replace("\n", " ").strip()
            texts.append(text.rstrip(". "))
    return [t for t in texts if t]


@torch.no_grad()
def _output_scale(model, hook: _TrainingHook, tok, texts: Sequence[str]) -> float:
    rows = _rows(tok, [], list(texts)[:64])
    _, _, main = _forward(model, hook, rows, with_side=False)
    return float(main[rows.real].median())


@torch.no_grad()
def _all_answered(model, hook: _TrainingHook, tok, edits: Sequence[Edit], irrelevant: Sequence[str],
                  alpha: float, beta: float, held: torch.Tensor | None = None) -> bool:
    """Every edit answered by the side memory, every answer position above `beta`, every quiet one below `alpha`."""
    for start in range(0, len(edits), 64):
        rows = _rows(tok, edits[start : start + 64], [])
        logits, norms, _ = _forward(model, hook, rows)
        if not bool(_answered(logits, rows).all()) or bool((norms[rows.answer] < beta).any()):
            return False
        if bool((norms[rows.real & ~rows.answer] > alpha).any()):
            return False
    stats = _margins(model, hook, tok, [], irrelevant, held)
    return stats["irrelevant_max"] <= alpha


@torch.no_grad()
def _margins(model, hook: _TrainingHook, tok, edits: Sequence[Edit], irrelevant: Sequence[str],
             held: torch.Tensor | None = None) -> dict:
    """The smallest ‖ΔW·h‖ on an edit's answer positions, the largest on irrelevant texts, prompts and `held`."""
    starts, quiet = [], [0.0]
    for i in range(0, len(edits), 64):
        rows = _rows(tok, edits[i : i + 64], [])
        _, norms, _ = _forward(model, hook, rows)
        starts += norms[rows.answer].tolist()
        quiet += norms[rows.real & ~rows.answer].tolist()
    for i in range(0, len(irrelevant), 64):
        rows = _rows(tok, [], list(irrelevant[i : i + 64]))
        _, norms, _ = _forward(model, hook, rows, with_side=False)
        quiet += norms[rows.real].tolist()
    starts = starts or [float("inf")]
    patched = _held_max(held, hook.delta)
    return {"edit_min": min(starts), "edit_median": float(torch.tensor(starts).median()),
            "irrelevant_max": max(max(quiet), patched), "irrelevant_p99": float(torch.tensor(quiet).quantile(0.99)),
            "patched_max": patched}


def _threshold(stats: dict) -> float:
    """ε between the irrelevant side and the edits: their geometric mean when they are apart."""
    low, high = stats["irrelevant_max"], stats["edit_min"]
    if low < high:
        return math.sqrt(max(low, 1e-12) * high)
    return 0.88 * high  # they overlap: WISE's rule (0.88 × the smallest edit activation), routing may spill
