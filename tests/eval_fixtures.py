"""Tiny models and tokenizers for the evaluation tests, built in the test (nothing is downloaded).

- `word_tokenizer`: a word-level ``tokenizers`` tokenizer saved as tokenizer.json (one token per word,
  so fixtures can say exactly which token follows which).
- `random_llama`: a small ``LlamaForCausalLM`` with seeded random weights.
- `bigram_llama`: a Llama whose next-token logits depend only on the current token, given by a table
  (attention and MLP outputs are zeroed, the embeddings are one-hot). Continuations are then known.
- `bag_of_words_llama`: a one-layer Llama whose attention head 0 averages the prefix's one-hot words
  and whose head writes them where the LM head reads "toxic words -> toxic next word"; steering that
  head along the clean-minus-toxic direction must make continuations cleaner.
"""

from __future__ import annotations

import math
import os

import torch

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|potentially_unsafe|>"]
HARM_TAG = "<|potentially_unsafe|>"
CLEAN_WORDS = ["cat", "dog", "sun", "tree", "nice", "kind"]
TOXIC_WORDS = ["idiot", "stupid", "moron", "jerk"]
OTHER_WORDS = ["hello", "you", "they", "are", "the", "a", "so", "polite", "toxic", "very", "is"]
WORDS = OTHER_WORDS + CLEAN_WORDS + TOXIC_WORDS


def word_tokenizer(words=WORDS):
    """A PreTrainedTokenizerFast with one token per word (whitespace split), BOS/EOS/PAD/UNK and the harm tag."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=[HARM_TAG])


def llama_config(vocab_size, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_positions=128, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3, **kw)


def random_llama(tokenizer, seed=0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(len(tokenizer), **kw))
    return model.eval()


def save(model, tokenizer, path):
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _zero_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.zero_() if not name.endswith("layernorm.weight") and name != "model.norm.weight" else p.fill_(1.0)


def bigram_llama(tokenizer, table, default_logit=0.0):
    """Next-token logits = ``table[current][next]`` (``default_logit`` elsewhere), whatever came before.

    ``table``: {token: {next_token: logit}} with token strings. Works because the residual stream stays the
    one-hot embedding of the current token (attention and MLP write nothing), and the final RMSNorm of a
    one-hot vector is sqrt(hidden) times it.
    """
    from transformers import LlamaForCausalLM

    v = len(tokenizer)
    hidden = 8 * math.ceil(v / 8)  # 4 heads of an even size
    model = LlamaForCausalLM(llama_config(v, hidden=hidden, layers=1, heads=4, kv_heads=4, intermediate=8))
    _zero_(model)
    ids = tokenizer.convert_tokens_to_ids
    logits = torch.full((v, v), default_logit)
    for cur, nxt in table.items():
        for tok, logit in nxt.items():
            logits[ids(cur), ids(tok)] = logit
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :v] = torch.eye(v)
        model.lm_head.weight[:, :v] = logits.T / math.sqrt(hidden)  # weight[next, cur]
    return model.eval()


def bigram_logprobs(tokenizer, table, default_logit=0.0):
    """The exact next-token log-probabilities `bigram_llama` implements, as a [vocab, vocab] tensor."""
    v = len(tokenizer)
    logits = torch.full((v, v), default_logit, dtype=torch.float64)
    for cur, nxt in table.items():
        for tok, logit in nxt.items():
            logits[tokenizer.convert_tokens_to_ids(cur), tokenizer.convert_tokens_to_ids(tok)] = logit
    return torch.log_softmax(logits, dim=-1)


def bag_of_words_llama(tokenizer, strength=4.0):
    """One layer, two heads. Head 0 averages the one-hot words of the prefix (uniform attention) and
    o_proj copies that average into the upper half of the residual stream; the LM head turns the toxic
    words' share into logits for toxic words and the clean words' share into logits for clean words.
    Head 1 writes nothing. So head 0 carries toxicity and steering it must change the continuations."""
    from transformers import LlamaForCausalLM

    v = len(tokenizer)
    half = 4 * math.ceil(v / 4)
    hidden = 2 * half
    model = LlamaForCausalLM(llama_config(v, hidden=hidden, layers=1, heads=2, kv_heads=2, intermediate=8))
    _zero_(model)
    ids = tokenizer.convert_tokens_to_ids
    attn = model.model.layers[0].self_attn
    head_dim = hidden // 2
    with torch.no_grad():
        model.model.embed_tokens.weight[:, :v] = torch.eye(v)
        attn.v_proj.weight[:v, :v] = torch.eye(v) / math.sqrt(hidden)   # head 0 value = one-hot word
        attn.o_proj.weight[half:half + v, :v] = torch.eye(v)             # head 0 output -> upper half
        for group in (CLEAN_WORDS, TOXIC_WORDS):
            for nxt in group:
                for w in group:
                    model.lm_head.weight[ids(nxt), half + ids(w)] = strength
    assert head_dim >= v
    return model.eval()


def bpe_tokenizer(texts, vocab_size=300):
    """A byte-level BPE ``tokenizers`` tokenizer trained on ``texts`` (English text fixtures)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=[HARM_TAG])
