"""Drafters: what proposes the draft tree at the coordinator. All share one interface.

A drafter follows the request's *known tokens*: the prompt, then every token the target has
confirmed, ending with the current root. `extend(tokens, features)` appends newly known tokens and
the target's post-norm features of tokens before the root (a draft head pairs feature f_t with
token x_{t+1}, as EAGLE-1 does). `draft(...)` returns a tree rooted at the last known token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from engine.packed_linear import Projection, pack_linears
from engine.stage import ATTENTION, DTYPES, Head, KVCache, attention_mask, load_head, load_stage, model_config
from engine.tree import Order, TokenTree, TreeBuilder, build_tree, from_parents, graft, layout

logger = logging.getLogger(__name__)


class DraftError(ValueError):
    """A drafter cannot serve this target (vocabulary, hidden size, missing files)."""


class Drafter(Protocol):
    name: str

    def reset(self) -> None: ...

    def extend(self, tokens: list[int], features: torch.Tensor | None) -> None: ...

    def draft(self, *, topk: int, depth: int, budget: int, order: Order) -> TokenTree: ...


class _TreeRows:
    """Ancestor bookkeeping for the rows a drafter appends while building one tree."""

    def __init__(self) -> None:
        self.anc = np.zeros((0, 0), dtype=bool)

    def add(self, parent_rows: np.ndarray) -> torch.Tensor:
        """Append rows with the given parents (-1 = root); return their mask [k, rows so far] bool."""
        n, k = self.anc.shape[0], parent_rows.shape[0]
        anc = np.zeros((n + k, n + k), dtype=bool)
        anc[:n, :n] = self.anc
        for j, p in enumerate(parent_rows):
            if p >= 0:
                anc[n + j, :n] = self.anc[p, :n]
            anc[n + j, n + j] = True
        self.anc = anc
        return torch.from_numpy(anc[n:].copy())

    def depth(self, rows: np.ndarray) -> np.ndarray:
        return self.anc[rows].sum(axis=1)


class EagleHead(nn.Module):
    """EAGLE-1 draft head: fc over [token embedding, feature] plus one decoder layer without input norm."""

    def __init__(self, config: LlamaConfig, bias: bool = True) -> None:
        super().__init__()
        config._attn_implementation = ATTENTION  # grouped-query attention without K/V copies
        self.config = config
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=bias)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, 0)])
        self.layers[0].input_layernorm = nn.Identity()
        self.rotary = LlamaRotaryEmbedding(config=config)
        self.draft_ids: torch.Tensor | None = None  # the head's draft vocabulary (ascending ids), if it has one

    def forward(self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeds, features: [T, hidden] -> predicted next features [T, hidden]."""
        hidden = self.fc(torch.cat((embeds, features), dim=-1)).unsqueeze(0)  # [1, T, hidden]
        cos_sin = self.rotary(hidden, positions.unsqueeze(0))
        kwargs = {"position_embeddings": cos_sin, "attention_mask": mask}
        if cache is not None:
            cache.reserve(hidden.shape[1])
            kwargs["cache" if "cache" in _layer_params() else "past_key_values"] = cache
        out = self.layers[0](hidden, **kwargs)
        if cache is not None:
            cache.commit_write()
        return out[0]


def _layer_params() -> set[str]:
    import inspect

    return set(inspect.signature(LlamaDecoderLayer.forward).parameters)


def load_eagle_head(path: Path, dtype: torch.dtype, target_dir: Path | None = None) -> EagleHead:
    """Load a head directory (config.json + *.safetensors in the EAGLE-1 key layout).

    With `target_dir` (the target's model directory) the head must fit that target: flowspec
    metadata is checked for hidden size, vocabulary and weight fingerprint (engine/heads.py); a
    head without metadata (an official EAGLE-1 checkpoint) for hidden size only.
    """
    from engine.heads import mismatch, read_head_config

    path = Path(path)
    try:
        raw = read_head_config(path)
    except ValueError as error:
        raise DraftError(str(error)) from error
    if target_dir is not None:
        reason = mismatch(raw, path, Path(target_dir))
        if reason is not None:
            raise DraftError(reason)
    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "flowspec")})
    config.num_hidden_layers = 1
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f"found {', '.join(pickled)}, but only safetensors weights are loaded (no pickle): convert with "
                "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`") if pickled else (
                "expected model.safetensors with fc.* and layers.0.* tensors")
        raise DraftError(f"{path} has no .safetensors weights for the draft head: {hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    state = {k.removeprefix("model."): v for k, v in state.items() if "embed_tokens" not in k and "lm_head" not in k}
    head = EagleHead(config, bias="fc.bias" in state)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rotary")]
    if missing or unexpected:
        raise DraftError(f"{path}: draft head weights do not match the EAGLE-1 layout "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head.draft_ids = read_draft_vocab(path, config.vocab_size)
    return head.to(dtype).eval()


DRAFT_VOCAB_FILE = "draft_vocab.json"


def read_draft_vocab(path: Path, vocab: int) -> torch.Tensor | None:
    """The head's draft vocabulary (ascending token ids) from draft_vocab.json, or None without one."""
    file = Path(path) / DRAFT_VOCAB_FILE
    if not file.is_file():
        return None
    try:
        ids = json.loads(file.read_text(encoding="utf-8"))["ids"]
        ids = torch.tensor(ids, dtype=torch.long)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise DraftError(f"{file} is not a draft vocabulary ({error}): expected {{\"ids\": [ascending token ids]}}; "
                         "delete it to draft from the whole vocabulary") from error
    if ids.ndim != 1 or not len(ids) or int(ids.min()) < 0 or int(ids.max()) >= vocab or bool((ids[1:] <= ids[:-1]).any()):
        raise DraftError(f"{file} must list distinct token ids below {vocab} in ascending order; "
                         "delete it to draft from the whole vocabulary")
    return ids


class HeadDrafter:
    """Draft head (EAGLE-1 layout) using the target's embedding and LM head."""

    name = "head"

    def __init__(self, head: EagleHead, target: Head, draft_ids: torch.Tensor | None = None) -> None:
        if head.config.hidden_size != target.embed.shape[1]:
            raise DraftError(f"draft head hidden size {head.config.hidden_size} != target's {target.embed.shape[1]}")
        self.head, self.target = head, target
        # Drafts come from `draft_ids` only (ascending token ids; None: all). The LM head rows read per
        # draft level shrink in proportion. Verification always uses the full head: outputs do not change.
        lm_head = target.lm_head.detach()
        if draft_ids is not None and int(draft_ids.max()) >= lm_head.shape[0]:
            raise DraftError(f"draft vocabulary holds token id {int(draft_ids.max())}, past the target's {lm_head.shape[0]}")
        self._draft_ids = None if draft_ids is None else draft_ids.numpy()
        self._draft_lm_head = target.projection if draft_ids is None else Projection(lm_head[draft_ids])
        cfg = head.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(head.parameters()).dtype
        pack_linears(head)  # the drafter only runs the head forward; bf16 on CPU packs its weights once
        self.cache = KVCache([0], cfg.num_key_value_heads, head_dim, dtype)
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.features: list[torch.Tensor] = []
        self.n_pairs = 0
        self.cache.length = 0
        self._last: torch.Tensor | None = None
        self._builder: TreeBuilder | None = None  # the pool drafted from the current root
        self._builder_key: tuple[int, int] | None = None
        self._committed = 0
        self._tree_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def extend(self, tokens: list[int], features: torch.Tensor | None) -> None:
        self.tokens.extend(int(t) for t in tokens)
        if features is not None and features.shape[0]:
            self.features.extend(features.to(self.cache.keys.dtype))

    @torch.inference_mode()
    def draft(self, *, topk: int, depth: int, budget: int, order: Order) -> TokenTree:
        """A tree from the current root. Drafting again from the same root (a refill, a deeper
        pipedec level) reuses the pool and the head's cache rows of the earlier draft."""
        key = (len(self.tokens), topk)
        if self._builder is not None and self._builder_key == key:
            if depth > self._builder.depth:
                self._restore_tree_rows()
                try:
                    self._builder.grow(depth)
                finally:
                    self._stash_tree_rows()
            return self._builder.tree(budget, order, depth)
        self._builder = None
        n_new = len(self.tokens) - 1 - self.n_pairs
        if n_new > 0:
            if len(self.features) < self.n_pairs + n_new:
                raise DraftError("draft head is missing target features for known tokens")
            toks = torch.tensor(self.tokens[self.n_pairs + 1 : self.n_pairs + 1 + n_new])
            feats = torch.stack(self.features[self.n_pairs : self.n_pairs + n_new])
            pos = torch.arange(self.n_pairs, self.n_pairs + n_new)
            mask = attention_mask(n_new, self.cache.length, None, None)
            out = self.head(self.target.embed[toks], feats, pos, self.cache, mask)
            self.n_pairs += n_new
            self._last = out[-1]
        if self._last is None:
            raise DraftError("draft head has no context yet")
        committed = self._committed = self.cache.length
        rows = _TreeRows()
        outputs: list[torch.Tensor] = []
        k = min(topk, self._draft_lm_head.out_features)

        def step(tokens: np.ndarray, parent_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            feats = torch.stack([self._last if p < 0 else outputs[p] for p in parent_rows])
            tree_mask = rows.add(parent_rows)
            depth_ = torch.from_numpy(rows.depth(np.arange(len(outputs), len(outputs) + len(tokens))))
            pos = committed - 1 + depth_
            mask = attention_mask(len(tokens), self.cache.length, committed, tree_mask)
            out = self.head(self.target.embed[torch.from_numpy(tokens)], feats, pos, self.cache, mask)
            outputs.extend(out)
            return self._top(out, k)

        ids, lps = self._top(self._last[None], k)
        self._builder = TreeBuilder(self.tokens[-1], (ids[0], lps[0]), step, topk)
        self._builder_key = key
        try:
            self._builder.grow(depth)
        finally:
            self._stash_tree_rows()
        return self._builder.tree(budget, order, depth)

    def _stash_tree_rows(self) -> None:
        """Move the draft tree's K/V out of the cache, which then holds the known pairs only."""
        c, a = self.cache, self._committed
        self._tree_kv = (c.keys[:, :, :, a : c.length].clone(), c.values[:, :, :, a : c.length].clone())
        c.truncate(a)

    def _restore_tree_rows(self) -> None:
        keys, values = self._tree_kv
        c, a, n = self.cache, self._committed, keys.shape[3]
        c.reserve(n)
        c.keys[:, :, :, a : a + n] = keys
        c.values[:, :, :, a : a + n] = values
        c.length = a + n

    def _top(self, hidden: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[T, hidden] -> each row's k best (token ids, log-probs) over the draft vocabulary."""
        ids, lps = top_logprobs(self._draft_lm_head(hidden), k)
        return (ids if self._draft_ids is None else self._draft_ids[ids]), lps


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (token ids, log-probs) of [R, V] logits, best first, ties to the lower id."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True).numpy()
    vals, idx = torch.topk(logits, min(k + 1, logits.shape[-1]), dim=-1)  # one more, to see a tie at the boundary
    ids, top = idx.numpy()[:, :k].copy(), vals.numpy()[:, :k].copy()
    if vals.shape[-1] > k:
        for r in np.flatnonzero(vals.numpy()[:, k] == top[:, -1]):
            # a tie at the boundary: the lowest ids among the tied win, as engine.tree._topk does
            row = logits[r].numpy()
            cand = np.flatnonzero(row >= top[r, -1])
            ids[r] = cand[np.lexsort((cand, -row[cand]))][:k]
            top[r] = row[ids[r]]
    order = np.lexsort((ids, -top), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(top, order, -1) - lse


class ModelDrafter:
    """A smaller causal LM with the target's tokenizer, with its own tree-masked KV cache."""

    name = "model"

    def __init__(self, ref: str, dtype: str, target_vocab: int) -> None:
        cfg = model_config(ref)
        if cfg.vocab_size != target_vocab:
            raise DraftError(f"draft model vocabulary {cfg.vocab_size} != target's {target_vocab}: "
                             "a draft model must share the target's tokenizer")
        self.model = load_stage(ref, 0, cfg.num_hidden_layers, dtype)
        self.head = load_head(ref, dtype)
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.model.reset()
        self._last_logits: torch.Tensor | None = None

    def extend(self, tokens: list[int], features: torch.Tensor | None) -> None:
        self.tokens.extend(int(t) for t in tokens)

    @torch.inference_mode()
    def draft(self, *, topk: int, depth: int, budget: int, order: Order) -> TokenTree:
        cache = self.model.cache
        new = self.tokens[cache.length :]
        if new:
            pos = torch.arange(cache.length, len(self.tokens))
            out = self.model(torch.tensor(new), pos)
            self._last_logits = self.head.logits(out[-1:])[0]
        committed = cache.length
        rows = _TreeRows()

        def step(tokens: np.ndarray, parent_rows: np.ndarray) -> np.ndarray:
            first_row = rows.anc.shape[0]
            tree_mask = rows.add(parent_rows)
            depth_ = torch.from_numpy(rows.depth(np.arange(first_row, first_row + len(tokens))))
            out = self.model(torch.from_numpy(tokens), committed - 1 + depth_, committed, tree_mask)
            return torch.log_softmax(self.head.logits(out), dim=-1).numpy()

        root_lp = torch.log_softmax(self._last_logits, dim=-1).numpy()
        try:
            return build_tree(self.tokens[-1], root_lp, step, topk=topk, depth=depth, budget=budget, order=order)
        finally:
            cache.truncate(committed)


def _matches(seq: np.ndarray, n: int) -> np.ndarray:
    """Start indices of earlier occurrences of the last n tokens of seq, latest first."""
    return np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(seq[:-1], n) == seq[-n:], axis=1))[::-1]


def lookup_continuation(tokens: list[int], length: int, max_ngram: int) -> tuple[list[int], int]:
    """What followed the latest earlier occurrence of the longest matching n-gram (n <= max_ngram,
    up to `length` tokens), and that n; ([], 0) when nothing matches."""
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        for s in _matches(seq, n):
            follow = seq[s + n : s + n + length]
            if follow.size:
                return follow.tolist(), n
    return [], 0


class LookupDrafter:
    """Prompt lookup: continue the latest n-gram (n = 3, 2, 1) seen earlier in the known tokens."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3) -> None:
        self.max_ngram = max_ngram
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []

    def extend(self, tokens: list[int], features: torch.Tensor | None) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def draft(self, *, topk: int, depth: int, budget: int, order: Order) -> TokenTree:
        seq = np.asarray(self.tokens, dtype=np.int64)
        tokens, parents, scores = [int(seq[-1])], [-1], [0.0]
        child_of: dict[tuple[int, int], int] = {}
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            for rank, s in enumerate(_matches(seq, n)[:topk]):
                parent = 0
                for d, tok in enumerate(seq[s + n : s + n + depth]):
                    if len(tokens) > budget:
                        break
                    key = (parent, int(tok))
                    if key not in child_of:
                        child_of[key] = len(tokens)
                        tokens.append(int(tok))
                        parents.append(parent)
                        scores.append(-(d + 1) - 0.01 * rank - 0.1 * (self.max_ngram - n))
                    parent = child_of[key]
            if len(tokens) > 1:
                break
        tree = from_parents(tokens, parents, scores)
        if order == "score" and len(tree) > 1:
            return layout(tree.tokens, tree.parents, tree.scores, np.arange(len(tree)), "score")
        return tree


class LookupBranch:
    """Another drafter's tree with the prompt-lookup continuation grafted in as one more branch.

    Text that repeats earlier tokens (a summary quoting its source, code reusing names, a chat
    turn restating the question) is where a draft head guesses worst and lookup best. The branch's
    node at depth d scores d * log(p), where p is how often, in this request so far, a lookup
    token matched what the target then produced, counted apart for each n-gram length (prior 1/2).
    Nodes the head drafted too keep the larger score; the best `budget` drafts are kept. In level
    order (chunk, pipedec) the branch stays within `depth` levels so those trees keep their shape.
    """

    def __init__(self, inner: Drafter, length: int = 10, max_ngram: int = 3) -> None:
        self.inner, self.length, self.max_ngram = inner, length, max_ngram
        self.name = f"{inner.name}+lookup"
        self.reset()

    @property
    def tokens(self) -> list[int]:
        return self.inner.tokens

    def reset(self) -> None:
        self.inner.reset()
        self.hits = np.zeros(self.max_ngram + 1)
        self.misses = np.zeros(self.max_ngram + 1)
        self._proposed: tuple[list[int], int] | None = None

    def extend(self, tokens: list[int], features: torch.Tensor | None) -> None:
        if self._proposed is not None:
            branch, n = self._proposed
            matched = next((i for i, (a, b) in enumerate(zip(branch, tokens)) if a != int(b)), None)
            self.hits[n] += min(len(branch), len(tokens)) if matched is None else matched
            self.misses[n] += matched is not None
            self._proposed = None
        self.inner.extend(tokens, features)

    def match_rate(self, n: int) -> float:
        return float(np.clip((self.hits[n] + 1) / (self.hits[n] + self.misses[n] + 2), 0.05, 0.95))

    def draft(self, *, topk: int, depth: int, budget: int, order: Order) -> TokenTree:
        tree = self.inner.draft(topk=topk, depth=depth, budget=budget, order=order)
        length = self.length if order == "score" else min(self.length, depth)
        branch, n = lookup_continuation(self.inner.tokens, length, self.max_ngram)
        self._proposed = (branch, n) if branch else None
        if not branch:
            return tree
        scores = np.log(self.match_rate(n)) * np.arange(1, len(branch) + 1)
        return graft(tree, branch, scores, budget, order)


def default_draft_ids(head: EagleHead, vocab: int) -> torch.Tensor | None:
    """The ids a head drafts from: its own draft vocabulary when it has one (`flowspec distill` writes
    the tokens that make up nearly all of the target's answers), else the first third of a large
    vocabulary (byte-level BPE ids follow merge order, so the low ids are the frequent tokens),
    else all of a small one."""
    if head.draft_ids is not None:
        return head.draft_ids
    return torch.arange(vocab // 3) if vocab > 32768 else None


def make_drafter(spec: str | None, target_ref: str, target: Head, dtype: str, lookup_branch: bool = False) -> Drafter:
    """`lookup`, `head:PATH`, or a model reference for a draft model; None means lookup.

    A head is checked against the target when `target_ref` is its model directory. With
    `lookup_branch`, a head's or a draft model's trees also get the prompt-lookup branch.
    """
    vocab = target.lm_head.shape[0]
    if spec is None or spec == "lookup":
        return LookupDrafter()
    if spec.startswith("head:"):
        head = load_eagle_head(Path(spec[5:]), DTYPES[dtype], Path(target_ref) if Path(target_ref).is_dir() else None)
        drafter: Drafter = HeadDrafter(head, target, default_draft_ids(head, vocab))
    else:
        try:
            drafter = ModelDrafter(spec, dtype, vocab)
        except DraftError:
            raise
        except (OSError, ValueError) as exc:
            raise DraftError(f"cannot use '{spec}' as a drafter: {exc}") from exc
    return LookupBranch(drafter) if lookup_branch else drafter
