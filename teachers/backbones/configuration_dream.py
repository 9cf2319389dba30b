"""Configuration of Dream (Dream-org/Dream-v0-Instruct-7B): a Qwen2.5 configuration plus the diffusion keys.

The published `config.json` is a Qwen2.5-7B config (`rope_theta`, `rope_scaling: null`, `use_sliding_window`,
`max_window_layers`, ...) with `model_type: "Dream"` and `mask_token_id`; transformers' `Qwen2Config` accepts every
one of those keys, so `DreamConfig` only adds what Dream has beyond it. The defaults are the 7B checkpoint's values.

Loaded by fewstep directly and copied beside exported checkpoints (`auto_map`), so it imports only transformers.
"""

from transformers import Qwen2Config


class DreamConfig(Qwen2Config):
    """Qwen2.5 sizes and ids of a Dream-family masked-diffusion LM (every `Qwen2Config` field applies unchanged).

    Parameters that Dream adds:
        mask_token_id (`int`, defaults to 151666): the `<|mask|>` id that diffusion decoding starts from.
        causal (`bool`, defaults to `False`): the attention a forward uses when its call does not say. False is
            Dream's bidirectional attention; True makes a causal (autoregressive) checkpoint, such as the AR baseline.
    """

    model_type = "Dream"
    default_theta = 1_000_000.0  # Qwen2.5's RoPE base, used when a config gives no `rope_theta`

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 131072
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    mask_token_id: int | None = 151666
    causal: bool = False
