"""Configuration of LLaDA (GSAI-ML/LLaDA-8B-Instruct): the published OLMo-style keys, read and written unchanged.

LLaDA's `config.json` names its sizes the OLMo way (`d_model`, `n_layers`, `n_heads`, `mlp_hidden_size`, ...) and
carries every OLMo option, most of which the published checkpoint leaves at one value. `LLaDAConfig` keeps those
keys as they are, so a saved config reads like the published one, and exposes the standard transformers names
(`hidden_size`, `num_key_value_heads`, `rope_parameters`, ...) as aliases and read-only properties for the Llama
parts the model reuses. An option set to a variant that `modeling_llada.py` does not implement is refused here,
with a one-line error, before any weight loads. The defaults are the 8B checkpoint's values.

Loaded by fewstep directly and copied beside exported checkpoints (`auto_map`), so it imports only transformers.
"""

from typing import Any

from transformers import PretrainedConfig

# The values of each variant-selecting option that `modeling_llada.py` implements, the published one first. A key
# absent from a config (e.g. OLMo's `clip_qkv`) counts as its published value.
SUPPORTED_VARIANT = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None),  # OLMo: None means "same as include_bias", which must be False
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "alibi": (False,),
    "rope": (True,),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "weight_tying": (False,),
    "block_group_size": (1,),
    "embedding_dropout": (0.0,),
    "residual_dropout": (0.0,),
    "clip_qkv": (None,),
}


class LLaDAConfig(PretrainedConfig):
    """Sizes, options and token ids of a LLaDA masked-diffusion LM (OLMo key names).

    Parameters that set the architecture:
        d_model (`int`, defaults to 4096): width of the residual stream (`hidden_size`).
        n_layers (`int`, defaults to 32): transformer blocks (`num_hidden_layers`).
        n_heads (`int`, defaults to 32): query heads (`num_attention_heads`); must divide `d_model`.
        n_kv_heads (`int`, defaults to None): key/value heads; fewer than `n_heads` is grouped-query attention.
            None means `n_heads` (the 8B: 32, multi-head); `multi_query_attention: true` means 1.
        mlp_hidden_size (`int`, defaults to 12288): width of the SwiGLU MLP (`intermediate_size`); None means
            `mlp_ratio * d_model`.
        vocab_size (`int`, defaults to 126464): the tokenizer's ids.
        embedding_size (`int`, defaults to None): rows of the embedding and width of the logits; None means
            `vocab_size` (the 8B: both 126464).
        rope_theta (`float`, defaults to 500000.0): RoPE base.
        rope_full_precision (`bool`, defaults to True): rotate queries and keys in fp32 whatever the model dtype.
        max_sequence_length (`int`, defaults to 4096): `max_position_embeddings`.
        rms_norm_eps (`float`, defaults to 1e-5): RMSNorm epsilon.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities, in training only.
        init_std (`float`, defaults to 0.02): std of the normal init of a randomly built model
            (`initializer_range`).

    Token ids:
        mask_token_id (`int`, defaults to 126336): the `[MASK]` id that diffusion decoding starts from.
        pad_token_id, eos_token_id (`int`, default to 126081): `<|endoftext|>`, used both to pad and to end.

    fewstep's own parameter:
        causal (`bool`, defaults to False): the attention a forward uses when its call does not say. False is
            LLaDA's bidirectional attention; True makes a causal (autoregressive) checkpoint, such as the AR
            baseline. Written to config.json only when True, so a bidirectional checkpoint keeps the published keys.

    The other published options select variants: each must keep the value `SUPPORTED_VARIANT` gives (the
    published one). The remaining published keys (`init_fn`, `init_device`, `precision`, `flash_attention`,
    `alibi_bias_max`, ...) are kept and written back but change nothing here.
    """

    model_type = "llada"
    keys_to_ignore_at_inference = ["cache"]
    # The standard names transformers' parts read, stored under LLaDA's names.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "max_position_embeddings": "max_sequence_length",
        "initializer_range": "init_std",
        "tie_word_embeddings": "weight_tying",
    }

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # the 8B: 32 (= n_heads)
    multi_query_attention: bool | None = None
    mlp_hidden_size: int | None = 12288
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = None  # the 8B: 126464 (= vocab_size)
    rope: bool = True
    rope_theta: float = 500000.0
    rope_full_precision: bool = True
    max_sequence_length: int = 4096
    rms_norm_eps: float = 1e-5
    block_type: str = "llama"
    block_group_size: int = 1
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    bias_for_layer_norm: bool | None = False
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    include_bias: bool = False
    include_qkv_bias: bool = False
    input_emb_norm: bool = False
    scale_logits: bool = False
    weight_tying: bool = False
    alibi: bool = False
    alibi_bias_max: float = 8.0
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    residual_dropout: float = 0.0
    flash_attention: bool = False
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False
    mask_token_id: int | None = 126336
    pad_token_id: int | None = 126081
    eos_token_id: int | None = 126081
    causal: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        for key, supported in SUPPORTED_VARIANT.items():
            value = getattr(self, key, supported[0])
            if value not in supported:
                raise ValueError(
                    f"LLaDAConfig: {key}={value!r} is not supported (fewstep implements the published "
                    f"LLaDA variant, {key}={supported[0]!r})"
                )
        if self.d_model % self.n_heads:
            raise ValueError(f"LLaDAConfig: n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(f"LLaDAConfig: n_kv_heads={self.num_key_value_heads} must divide n_heads={self.n_heads}")

    # -- standard names for transformers' parts (derived, so they are never written to config.json; the settable
    # ones write LLaDA's key, so `LLaDAConfig(hidden_size=..., intermediate_size=...)` also works) --

    @property
    def num_key_value_heads(self) -> int:
        if self.multi_query_attention:
            return 1
        return self.n_kv_heads or self.n_heads

    @num_key_value_heads.setter
    def num_key_value_heads(self, value: int) -> None:
        self.n_kv_heads, self.multi_query_attention = value, None

    @property
    def intermediate_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @intermediate_size.setter
    def intermediate_size(self, value: int) -> None:
        self.mlp_hidden_size = value

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_parameters(self) -> dict[str, Any]:
        # What `LlamaRotaryEmbedding` reads; LLaDA has plain RoPE with base `rope_theta`.
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    @rope_parameters.setter
    def rope_parameters(self, value: dict[str, Any] | None) -> None:
        # `PretrainedConfig.__post_init__` standardises RoPE settings by writing this dict back; keep only the base.
        value = value or {}
        if value.get("rope_type", value.get("type", "default")) != "default":
            raise ValueError(f"LLaDAConfig: rope_parameters={value!r} is not supported (LLaDA uses plain RoPE)")
        if value.get("rope_theta") is not None:
            self.rope_theta = value["rope_theta"]

    def to_dict(self) -> dict[str, Any]:
        # `causal` is fewstep's key: a bidirectional checkpoint saves exactly the published keys.
        output = super().to_dict()
        if not output.get("causal"):
            output.pop("causal", None)
        return output
