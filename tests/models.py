"""Tiny models of every supported architecture, built from configs (no downloads, no dropout)."""

from __future__ import annotations

import math

import torch
import transformers as T

VOCAB = 64
CAUSAL = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "gptj", "gpt_neox",
          "falcon", "opt", "mamba"]
MASKED = ["bert", "roberta"]
ARCHITECTURES = CAUSAL + MASKED


def tiny_model(name: str, layers: int = 3, seed: int = 0, init_std: float = 0.2) -> torch.nn.Module:
    """A 3-layer model; a larger init spreads the router's scores well apart (FINDINGS.md)."""
    torch.manual_seed(seed)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, initializer_range=init_std)
    bert_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=72, initializer_range=init_std)
    builders = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**llama_like)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**llama_like)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**llama_like)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **llama_like)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(head_dim=8, **llama_like)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, final_logit_softcapping=2.0, **llama_like)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(pad_token_id=0, **llama_like)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB,
                                                      n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                                      attn_pdrop=0.0, initializer_range=init_std)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB,
                                                      n_positions=64, rotary_dim=4, resid_pdrop=0.0,
                                                      embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=init_std)),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            vocab_size=VOCAB, initializer_range=init_std)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=layers,
                                                            num_attention_heads=4, vocab_size=VOCAB,
                                                            initializer_range=init_std)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                                                   num_attention_heads=4, vocab_size=VOCAB, dropout=0.0,
                                                   word_embed_proj_dim=32, max_position_embeddings=64,
                                                   init_std=init_std)),
        "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(hidden_size=32, num_hidden_layers=layers,
                                                         vocab_size=VOCAB, state_size=4, expand=2,
                                                         initializer_range=init_std)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(**bert_like)),
        "roberta": lambda: T.RobertaForMaskedLM(T.RobertaConfig(pad_token_id=1, **bert_like)),
    }
    model = builders[name]()
    model.train()
    return model


def batch(name: str, b: int = 6, t: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random tokens (no repeated runs: they give near-tied scores), one right-padded row, and
    -100 labels on the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, t - 4:] = 0
    if name in MASKED:
        labels = torch.full_like(ids, -100)
        labels[:, 1::3] = ids[:, 1::3]
    else:
        labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_selection(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, granularity: str,
                        ratio: float) -> torch.Tensor:
    """The rows or tokens a top-k router on ``scoring='loss'`` picks, chosen by hand: the eager
    reference that the parity tests hold both entry points to.

    ``logits`` score ``target`` (aligned: position ``t`` predicts ``target[t]``) where ``valid``.
    ``sequences``: the sorted indices of the ``ceil(ratio * B)`` rows of highest mean NLL (a row
    with no valid token never wins); ``tokens``: a ``(B, T)`` mask of the ``ceil(ratio * n)`` valid
    tokens of highest NLL. Ties go to the lower index.
    """
    nll = -torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    if granularity == "sequences":
        seq = nll.sum(1) / valid.sum(1).clamp(min=1)
        seq = torch.where(valid.any(1), seq, torch.full_like(seq, -math.inf))
        k = math.ceil(ratio * seq.numel())
        order = sorted(range(seq.numel()), key=lambda i: (-seq[i].item(), i))
        return torch.tensor(sorted(order[:k]))
    flat = torch.where(valid, nll, torch.full_like(nll, -math.inf)).flatten()
    n = int(valid.sum())
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))[: math.ceil(ratio * n)]
    sel = torch.zeros(flat.numel(), dtype=torch.bool)
    sel[order] = True
    return sel.view_as(valid)
