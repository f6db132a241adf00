"""A tiny random Llama with a small byte-level BPE (trained on Python's help topics), saved as a plain HF folder."""

from __future__ import annotations

from pathlib import Path


def save_tiny_llama(out: Path, vocab_size: int, max_position_embeddings: int, bos_prefix: bool, seed: int = 0) -> Path:
    """Write a 2-layer Llama (hidden 64, GQA 4/2) and its tokenizer to `out`.

    Args:
        vocab_size (`int`): BPE vocabulary size.
        max_position_embeddings (`int`): the model's context length.
        bos_prefix (`bool`): whether the tokenizer prepends `<s>` (lm-eval wants a prefix token).
        seed (`int`): seed of the random weights.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hf_attn_zoo.assets.corpora import corpus_texts

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts("python_stdlib_docs", split="all"), trainer)
    if bos_prefix:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    hf_tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        vocab_size=len(hf_tok),
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out
