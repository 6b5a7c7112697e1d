"""Word-level tokenizer for the demo world.

One token per word/punctuation/digit: the world text is already space-separated (see
problems.py), so a WordLevel model over a whitespace pre-tokenizer is exact and tiny. Special
tokens have fixed ids (pad 0, bos 1, eos 2, unk 3); the rest of the vocabulary is the generator's
word list, sorted, so it is a pure function of the code.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spd_verl.world import problems

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
PROMPT_WORDS = ["Q", "A"]  # chat-template markers

# "<s>Q : {problem} A :" then the solution and "</s>". The generation prompt is " A :", so
# apply_chat_template(..., add_generation_prompt=True) yields exactly the training prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q : {{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %} A : {{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} A :{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(problems.vocabulary()) | set(PROMPT_WORDS))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # No decoder: WordLevel decoding joins tokens with single spaces, which is the world's text
    # format, so decode(encode(text)) == text.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    return fast


def prompt_text(problem_text: str) -> str:
    """The rendered chat prompt, as CHAT_TEMPLATE renders it (tests check they agree)."""
    return f"<s>Q : {problem_text} A :"


def prompt_ids(tokenizer, problem_text: str) -> list[int]:
    """Token ids of the chat prompt for one problem (the models' training prompt)."""
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem_text}], add_generation_prompt=True, tokenize=True
    )
    # transformers 5 may return a BatchEncoding-like mapping; 4.x returns a list.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)
