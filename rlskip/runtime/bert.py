"""Skip-aware runtime for BERT-layout sequence classifiers: ``BertForSequenceClassification`` (BERT, MiniLM)
and ``RobertaForSequenceClassification``. Kind ``encoder``, head ``classifier``.

Everything the forward pass needs is in this file, reading the Hugging Face module's own parameters (no
copies). What differs from the Hugging Face forward:

- **Skipping.** BERT is post-LN (``x = LayerNorm(x + sublayer(x))``), as BART is: a skipped sub-layer, its
  LayerNorm included, leaves the residual stream untouched.
- **Rows.** Each sub-layer runs only on the rows whose plan executes it (:mod:`rlskip.runtime.rows`).
- **Token dropping.** After the first layer, dropped tokens leave the tensors (re-packed). Position embeddings
  were added before, so the others keep their original positions. Never dropped: the first token ([CLS] /
  ``<s>``, which the head reads) and every occurrence of the id that ends the input ([SEP] / ``</s>``).
- **Inputs.** Right-padded, as the tokenizers pad and the head assumes (it reads the first position). BERT's
  segment ids (``token_type_ids``) are derived from the input: tokens after the first [SEP] belong to the
  second segment, which is what BERT's tokenizer gives a pair of texts. RoBERTa has one segment; its
  positions count real tokens from ``padding_idx + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification, RobertaForSequenceClassification

from rlskip import flops as fl
from rlskip.plan import Plan
from rlskip.runtime import register_runtime
from rlskip.runtime.base import ClassifyOutput, ModelDims, Observation, Runtime
from rlskip.runtime.rows import key_mask, on_rows, pack_tokens, pick, row_sets, merge_heads as _merge, split_heads as _heads
from rlskip.space import SkipSpace


@register_runtime
class BertRuntime(Runtime):
    """Execute a BERT-layout sequence classifier under per-instance plans (weights used in place, never copied)."""

    family = "bert"
    kind = "encoder"

    @classmethod
    def accepts(cls, model) -> bool:
        return isinstance(model, (BertForSequenceClassification, RobertaForSequenceClassification))

    def __init__(self, model: nn.Module) -> None:
        if not self.accepts(model):
            raise ValueError(
                f"unsupported model for the BERT runtime: {type(model).__name__}; expected "
                "BertForSequenceClassification or RobertaForSequenceClassification"
            )
        self.model = model
        cfg = self.config = model.config
        self.core = model.base_model
        self.layers = self.core.encoder.layer
        self.roberta = isinstance(model, RobertaForSequenceClassification)
        self.space = SkipSpace.single_stack("bert", len(self.layers), token_dropping=True)
        # RoBERTa's position ids start after padding_idx, which shortens its longest input
        first_pos = cfg.pad_token_id + 1 if self.roberta else 0
        self.dims = ModelDims(cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings - first_pos)
        self.head = "classifier"
        self.attn = fl.AttentionShape.mha(cfg.hidden_size, cfg.num_attention_heads)
        bit = self.space.bit
        self._bits = [(bit(f"{i}.attn"), bit(f"{i}.ffn")) for i in range(1, len(self.layers))]

    # ------------------------------------------------------------------------------------------------
    # sub-layers: each takes the residual stream and returns it updated (post-LN)
    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p=p, training=self.model.training) if p > 0 else x

    def _attn(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a, out = layer.attention.self, layer.attention.output
        nh = a.num_attention_heads
        q = _heads(F.linear(x, a.query.weight, a.query.bias), nh)
        k = _heads(F.linear(x, a.key.weight, a.key.bias), nh)
        v = _heads(F.linear(x, a.value.weight, a.value.bias), nh)
        p = self.config.attention_probs_dropout_prob if self.model.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=a.scaling)
        h = F.linear(_merge(o), out.dense.weight, out.dense.bias)
        return out.LayerNorm(x + self._dropout(h, self.config.hidden_dropout_prob))

    def _ffn(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inter, out = layer.intermediate, layer.output
        h = inter.intermediate_act_fn(F.linear(x, inter.dense.weight, inter.dense.bias))
        h = F.linear(h, out.dense.weight, out.dense.bias)
        return out.LayerNorm(x + self._dropout(h, self.config.hidden_dropout_prob))

    # ------------------------------------------------------------------------------------------------
    def observe(self, input_ids: torch.Tensor, attention_mask=None, protected=None) -> Observation:
        """Embeddings (word, position, segment) and the fixed-on first layer for a batch of right-padded inputs."""
        mask = self.check_inputs(input_ids, attention_mask)
        ranks = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        lengths = mask.sum(1, keepdim=True)
        if not torch.equal(mask, ranks < lengths):
            raise ValueError("BERT-style classifiers read the first position: inputs must be right-padded")
        sep = (input_ids == input_ids.gather(1, lengths - 1)) & mask  # every occurrence of the id ending the input
        positions = ranks
        if self.roberta:  # Hugging Face's create_position_ids_from_input_ids: padding sits at padding_idx
            pad = self.config.pad_token_id
            positions = torch.where(mask, ranks + pad + 1, pad)
        segments = torch.zeros_like(input_ids)
        if self.config.type_vocab_size > 1:  # sentence B: the real tokens after the first [SEP]
            segments = (((sep.cumsum(1) - sep.long()) > 0) & mask).long()
        emb = self.core.embeddings
        h = emb.word_embeddings(input_ids) + emb.token_type_embeddings(segments)
        h = self._dropout(emb.LayerNorm(h + emb.position_embeddings(positions)), self.config.hidden_dropout_prob)
        first = self.layers[0]
        h = self._ffn(first, self._attn(first, h, key_mask(mask)))
        head_token = ranks == 0
        return Observation(h, mask, input_ids, self.always_keep(mask, head_token, sep, protected), positions)

    def classify(self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None) -> ClassifyOutput:
        """The remaining layers under the plan on the kept tokens, then the classification head on the first
        token (BERT: pooler then classifier; RoBERTa: its classification head)."""
        self.check_plan(obs, plan)
        keep = self.keep_mask(obs, plan)
        if keep is None:  # scatters write in place; the observation stays intact
            h, mask = obs.hidden.clone(), obs.attention_mask
        else:
            mask, (h,) = pack_tokens(keep, obs.hidden)
        rows = row_sets(plan.bits)
        for layer, (ba, bf) in zip(self.layers[1:], self._bits):
            ra = rows[ba]
            h = on_rows(h, ra, lambda x, layer=layer, ra=ra: self._attn(layer, x, key_mask(pick(mask, ra))))
            h = on_rows(h, rows[bf], lambda x, layer=layer: self._ffn(layer, x))
        m = self.model
        logits = m.classifier(h) if self.roberta else m.classifier(m.dropout(self.core.pooler(h)))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        kept = mask.sum(1)
        executed, full = self.flops(plan, obs.lengths.cpu(), kept.cpu())
        return ClassifyOutput(logits, loss, executed, full, kept)

    def decoder(self, obs: Observation, plan: Plan, beams: int, capacity: int):
        raise ValueError("the BERT runtime wraps a sequence classifier (no LM head): use classify(), not generate()")

    def forward(self, obs: Observation, plan: Plan, labels=None, decoder_input_ids=None):
        raise ValueError("the BERT runtime wraps a sequence classifier (no LM head): use classify(), not forward()")

    def flops_table(self, lengths, kept, steps, beams: int = 1):
        """The first layer over ``lengths`` tokens, the others over ``kept``, and the head on one token (BERT's
        pooler and classifier, or RoBERTa's dense and output projection: the same two products)."""
        if steps is not None:
            raise ValueError("the BERT runtime classifies in one pass: its FLOPs take steps=None")
        c, a = self.config, self.attn
        sf, sk = fl.lengths(lengths, kept)
        d, f = c.hidden_size, c.intermediate_size
        fixed = fl.attention(a, sf, sf) + fl.mlp(sf, d, f) + fl.linear(1, d, d) + fl.linear(1, d, c.num_labels)
        per_kind = {"attn": fl.attention(a, sk, sk), "ffn": fl.mlp(sk, d, f)}
        return fixed, torch.stack([per_kind[cand.kind] for cand in self.space.skippable], dim=1)
