"""The inference API: what a user of an M2D-CLAP checkpoint imports.

Loading our checkpoints (and, later in this file, the released ones) into a
model ready for feature extraction.
"""

from __future__ import annotations

import model as m2d
import runs
import text_embed


def build_model(ckpt: dict, with_tokenizer: bool = True) -> tuple[m2d.M2DCLAP, object | None]:
    """The model of a checkpoint and, if it has a text encoder (and with_tokenizer), its tokenizer.

    A checkpoint is self-contained: model weights (text encoder included),
    shapes, normalisation statistics, and the text encoder's architecture with
    a reference to its tokenizer.
    """
    model_config, state = runs.upgraded(ckpt)
    text_encoder = tokenizer = None
    if ckpt.get("text_encoder"):
        text_encoder = text_embed.text_encoder_from_config(ckpt["text_encoder"]["config"])
        if with_tokenizer:
            tokenizer = text_embed.load_tokenizer(ckpt["text_encoder"]["name"])
    model = m2d.M2DCLAP(m2d.M2DConfig(**model_config), tuple(ckpt["norm_stats"]), text_encoder)
    model.load_state_dict(state)
    return model, tokenizer
