"""Tiny models of every family weightlift finds stacks in, each with a sample input for one forward.

``build(family) -> (model, kwargs)``: the model in eval mode, built from a config with a fixed seed (no hub
access), and the keyword arguments of one forward (``model(**kwargs)``). ``STACKS[family]`` is what
`weightlift.models.find_stacks` must return for it: ``[(dotted path, number of layers), ...]`` in execution order.
"""

from __future__ import annotations

import torch
from torch import nn

from conftest import FAMILIES as DECODERS
from conftest import VOCAB, prompt, tiny

LAYERS = 2  # layers per stack in every family below


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _decoder(family: str):
    return lambda: (tiny(family, layers=LAYERS), {"input_ids": prompt()})


def _falcon():
    import transformers as tf

    cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                          new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
                          bos_token_id=1, eos_token_id=2)  # fmt: skip
    return tf.FalconForCausalLM(cfg), {"input_ids": prompt()}


def _bert():
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    ids = prompt()
    return tf.BertForMaskedLM(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _t5():
    import transformers as tf

    cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                      num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)  # fmt: skip
    return tf.T5ForConditionalGeneration(cfg), {"input_ids": prompt(), "decoder_input_ids": prompt(seed=2, length=4)}


def _llava():
    import transformers as tf

    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                                 image_size=16, patch_size=8, num_channels=3, projection_dim=32)  # fmt: skip
    text = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)  # fmt: skip
    image_token = VOCAB - 1
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=4,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")  # fmt: skip
    model = tf.LlavaForConditionalGeneration(cfg)
    text_ids = torch.randint(3, image_token, (1, 6), generator=_gen(1))
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, 4), image_token), text_ids], dim=1)  # one token per patch
    pixels = torch.randn(1, 3, 16, 16, generator=_gen(3))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _flux():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=LAYERS, num_single_layers=LAYERS,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))  # fmt: skip
    image, text = 16, 6  # tokens
    g = _gen(3)
    return model, {
        "hidden_states": torch.randn(1, image, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
        "pooled_projections": torch.randn(1, 16, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                               dim=-1).reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }  # fmt: skip


def _sd3():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=LAYERS, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)  # fmt: skip
    g = _gen(3)
    return model, {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
        "pooled_projections": torch.randn(1, 16, generator=g),
        "timestep": torch.tensor([10]),
        "return_dict": False,
    }


def _unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                 layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
    g = _gen(3)
    return model, {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
        "return_dict": False,
    }


BUILDERS = {
    **{family: _decoder(family) for family in DECODERS},
    "falcon": _falcon,
    "bert": _bert,
    "t5": _t5,
    "llava": _llava,
    "flux": _flux,
    "sd3": _sd3,
    "unet": _unet,
}
FAMILIES = list(BUILDERS)

_DECODER_PATHS = {"gpt2": "transformer.h", "opt": "model.decoder.layers", "falcon": "transformer.h"}
STACKS: dict[str, list[tuple[str, int]]] = {
    **{family: [(_DECODER_PATHS.get(family, "model.layers"), LAYERS)] for family in [*DECODERS, "falcon"]},
    "bert": [("bert.encoder.layer", LAYERS)],
    "t5": [("encoder.block", LAYERS), ("decoder.block", LAYERS)],
    "llava": [("model.vision_tower.encoder.layers", LAYERS), ("model.language_model.layers", LAYERS)],
    "flux": [("transformer_blocks", LAYERS), ("single_transformer_blocks", LAYERS)],
    "sd3": [("transformer_blocks", LAYERS)],
    "unet": [("down_blocks", 2), ("up_blocks", 2)],
}


def build(family: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A tiny model of ``family`` in eval mode and the keyword arguments of one forward."""
    torch.manual_seed(seed)
    model, kwargs = BUILDERS[family]()
    return model.eval(), kwargs
