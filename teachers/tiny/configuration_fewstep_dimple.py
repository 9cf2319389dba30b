"""Configuration of the embedded Dimple-family model (a Qwen2-style diffusion LM).

This file is self-contained on purpose: it is copied next to exported checkpoints so that
`AutoConfig.from_pretrained(dir, trust_remote_code=True)` works without fewstep installed.
"""

from transformers import PretrainedConfig


class FewstepDimpleConfig(PretrainedConfig):
    """Sizes and token ids of a Dimple-family diffusion LM.

    Args:
        vocab_size: number of token ids (the tokenizer's length).
        hidden_size: width of the residual stream.
        intermediate_size: width of the SwiGLU MLP.
        num_hidden_layers: transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention; must divide the query heads).
        max_position_embeddings: longest sequence the RoPE tables are sized for.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        mask_token_id: the `[MASK]` id that diffusion decoding starts from.
        shifted_logits: True as in Dream/Dimple (position i-1 scores token i); False as in LLaDA.
        causal: default attention mode; False (bidirectional) for diffusion, True for the AR phase.
    """

    model_type = "fewstep-dimple"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 128,
        intermediate_size: int = 384,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        mask_token_id: int = 0,
        pad_token_id: int = 1,
        bos_token_id: int = 2,
        eos_token_id: int = 3,
        shifted_logits: bool = True,
        causal: bool = False,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.shifted_logits = shifted_logits
        self.causal = causal
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
