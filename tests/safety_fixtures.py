"""Fixtures for the safety-data tests: labelled corpora, a tiny BERT encoder and a tiny GPT-2 generator,
both with random weights and their own small tokenizers, built on the spot (nothing is downloaded)."""

import json
import random

BAD = "idiot stupid moron hate kill ugly".split()
GOOD = "lovely garden weather coffee book music friend".split()


def labelled_records(n=1200, seed=0, kind="score"):
    """Texts whose share of bad words follows a 0-5 score; ``kind`` picks how the label is written."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = rng.randint(0, 5)
        text = " ".join(rng.choice(BAD if rng.random() < s / 5 else GOOD) for _ in range(12))
        label = {"score": s, "binary": int(s >= 3), "probability": round(s / 5, 2)}[kind]
        out.append({"text": text, "label": label})
    return out


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _wordpiece_tokenizer(texts, vocab_size=200):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def make_tiny_bert(path):
    """A random 1-layer BERT encoder (a base model to fine-tune) with a WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    tok = _wordpiece_tokenizer([" ".join(BAD + GOOD)] * 10)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_tiny_gpt2(path, max_positions=256):
    """A random 2-layer GPT-2 with a byte-level BPE tokenizer whose EOS is <|endoftext|>."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Rewrite the following text so that it is respectful and safe. " + " ".join(BAD + GOOD)] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                     unk_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(hf_tok), n_positions=max_positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=hf_tok.eos_token_id, eos_token_id=hf_tok.eos_token_id)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    hf_tok.save_pretrained(path)
    return str(path)
