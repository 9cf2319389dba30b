"""Character-level tokenizer for the embedded model, built locally with `tokenizers`.

Every printable ASCII character (and newline) is one token, so digits are never merged and arithmetic stays
position-aligned. Special tokens follow the Dimple/Dream roles: `<|mask|>` (diffusion mask), `<|pad|>`,
`<|bos|>`, `<|eos|>`, `<|unk|>`, plus `<|user|>` / `<|assistant|>` role markers used by the chat template.
Saved with `save_pretrained` it reloads with `AutoTokenizer.from_pretrained` (no fewstep code needed).
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|mask|>", "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|user|>", "<|assistant|>"]
CHARACTERS = ["\n"] + [chr(code) for code in range(32, 127)]

# The prompt a model sees is `<|bos|><|user|>{question}<|assistant|>`; a reference answer is followed by EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(
    extra_special_tokens: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE
) -> PreTrainedTokenizerFast:
    """A fresh character tokenizer; ids 0..6 are the special tokens in `SPECIAL_TOKENS` order.

    `extra_special_tokens` (e.g. a published chat format's `<|im_start|>`, `<|im_end|>`) follow the characters;
    `chat_template` replaces the compact default.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS + list(extra_special_tokens))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        mask_token="<|mask|>",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", *extra_special_tokens],
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    return tokenizer
