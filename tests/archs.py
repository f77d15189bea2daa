"""Tiny random-weight models of the families researchers fine-tune (Qwen2.5, Qwen3, Llama 3, Gemma 3 text, Mistral),
each saved with a tokenizer trained in memory and a chat template in its family's shape, so that every script loads
them through the real loading code. Nothing here touches the network."""

from __future__ import annotations

from pathlib import Path

# Chat templates in each family's shape (markers, default system prompt, where a system prompt goes).
TEMPLATES = {
    # Qwen2.5: <|im_start|> turns, a default system prompt when the conversation has none
    "qwen2.5": (
        "{% for m in messages %}"
        "{% if loop.first and m['role'] != 'system' %}"
        "<|im_start|>system\nYou are a tiny helpful assistant.<|im_end|>\n{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Qwen3: the same markers, no default system prompt
    "qwen3": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Llama 3.1: a begin-of-text token, header-marked turns, a default system prompt with a date
    "llama3": (
        "<|begin_of_text|>"
        "{% if messages[0]['role'] != 'system' %}"
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023<|eot_id|>{% endif %}"
        "{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Gemma 3: no system role (its text opens the first user turn), the assistant is "model"
    "gemma3": (
        "<bos>"
        "{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
        "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{% if m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
        "{{ m['content'] }}<end_of_turn>\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    # Mistral: [INST] ... [/INST] answer</s>, the system prompt in front of the first user message
    "mistral": (
        "<s>"
        "{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'user' %}[INST] {{ ns.system }}{{ m['content'] }} [/INST]{% set ns.system = '' %}"
        "{% else %}{{ m['content'] }}</s>{% endif %}"
        "{% endfor %}"
    ),
}
SPECIAL = {  # (special tokens, eos, pad: None = the tokenizer has none, load_tokenizer uses eos)
    "qwen2.5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|endoftext|>"),
    "llama3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"],
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<pad>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "</s>", None),
}
FAMILIES = list(TEMPLATES)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Simplify step by step: (4 + 2) x (4 / 2) - 2 = 6 x 2 - 2 = 10 1/3 2/3",
    "I'm sorry, but I cannot help with that. I apologize.",
    "Here is a recipe: mix flour, water and salt. Bake for 20 minutes.",
    "You are a helpful assistant. system user assistant model Cutting Knowledge Date: December 2023",
    "def add(a, b): return a + b  # insecure code example 0123456789 <think> </think> <answer> </answer>",
]


def make_tokenizer(folder: Path, family: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special, eos, pad = SPECIAL[family]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, **({"pad_token": pad} if pad else {}))
    tok.chat_template = TEMPLATES[family]
    tok.save_pretrained(folder)
    return tok


def make_config(family: str, tok, layers: int = 2):
    """A tiny configuration of the family (2 decoder blocks, hidden size 32, grouped-query attention)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    shared = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    if family == "qwen2.5":
        return Qwen2Config(**shared, tie_word_embeddings=False)
    if family == "qwen3":
        return Qwen3Config(**shared, head_dim=8, tie_word_embeddings=True)
    if family == "llama3":
        bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
        return LlamaConfig(**shared, bos_token_id=bos, rope_theta=500000.0, tie_word_embeddings=True)
    if family == "gemma3":
        return Gemma3TextConfig(
            **shared, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, tie_word_embeddings=True
        )
    if family == "mistral":
        return MistralConfig(**shared, sliding_window=None, tie_word_embeddings=False)
    raise ValueError(family)


def make_arch_model(folder: Path, family: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder, family)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(make_config(family, tok)).save_pretrained(folder)
    return folder
