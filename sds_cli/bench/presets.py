"""Random-weight model shapes that sds-bench times: speed depends on shapes, not values."""
from __future__ import annotations

SHAPES = {  # random-weight stand-ins: (family, architecture)
    "smollm2-135m": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}),
    "opt-1.3b": ("opt", {"hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                         "word_embed_proj_dim": 2048, "vocab_size": 50272}),
    "llama-2-7b": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}),
}


MLP_SHAPES = {"llama-2-7b-mlp": {"hidden_size": 4096, "intermediate_size": 11008}}  # Llama-2-7B gate/up/down

PRESETS = [*SHAPES, *MLP_SHAPES]
