"""M2D-CLAP model: the ViT audio encoder, masked modeling duo (M2D) and the CLAP heads.

Everything here is an nn.Module (or a pure tensor function) and imports torch
only, so the whole file can be pasted into other research code.

Reading order follows the data:
    log-mel [B, 1, F, T] -> (x - mean) / std with the stored norm_stats
      -> PatchEmbed (16x16 patches, frequency-major order)       [B, N, D]
      -> random_masking: visible / masked patch indices
      -> online encoder (blocks, norm) on visible patches + CLS  [B, 1+Nv, D]
      -> predictor (decoder_*) fills the masked positions        [B, Nm, D]
      -> target encoder (target_blocks, target_norm), EMA copy,
         fed with the masked patches only                        [B, Nm, D]
      -> audio_proj on the online patch features  -> CLAP audio  [B, D]
      -> text_proj on sentence embeddings         -> CLAP text   [B, D]
         (stages 2 and 2.1: a trainable text_encoder on tokens, then text_proj)
Fine-tuning (stage 1.1, downstream tasks) puts a head on the same encoder:
    normalised log-mel -> AudioEncoder path (structured token drop while
    training) -> mean or stacked-column pooling -> BatchNorm -> Linear
AudioEncoder is that one encoder path; M2DCLAP and AudioClassifier extend it.
Captioning (caption.py) reads the frozen encoder's frame features:
    frame features [B, T, F*D] (+ CLAP audio [B, D]) -> CaptionPrefix [B, S, W]
      -> a sequence-to-sequence language model passed in (BART)  -> logits [B, L, V]
      -> beam_search writes the caption token by token

The losses live in losses.py; the training loops in train.py and finetune.py.
Submodule names give the state-dict keys of the released M2D / M2D-CLAP
checkpoints (cls_token, pos_embed, patch_embed.proj, blocks.{i}.attn.qkv,
target_blocks, decoder_blocks, audio_proj.sem_token, text_proj, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# -----------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class M2DConfig:
    """Model shape. The defaults are the 2025 M2D-CLAP ViT-Base (80 x 1001 input)."""

    n_mels: int = 80              # frequency bins of the input log-mel
    crop_frames: int = 1001       # time frames of a training crop (100 frames per second)
    patch_size: int = 16          # square patches over (frequency, time)
    embed_dim: int = 768          # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    predictor_dim: int = 512      # M2D predictor ("decoder") width
    predictor_depth: int = 8
    predictor_heads: int = 16
    mask_ratio: float = 0.7       # share of patches hidden from the online encoder
    audio_proj: str = "semantic"  # "semantic" (2025) or "mlp" (2024)
    audio_proj_depth: int = 1     # blocks of the semantic projector (released files have 1 to 4)
    text_dim: int = 4096          # width of the precomputed sentence embeddings (NV-Embed-v2)
    text_proj: str = "linear"     # "linear", "mlp" or "none" (text already D wide)
    text_pooling: str = "cls"     # text-encoder feature: "cls" (BERT, 2025) or "mean" over real tokens
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory (Large)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(F, T) patch grid; trailing frames that do not fill a patch are dropped."""
        return self.n_mels // self.patch_size, self.crop_frames // self.patch_size

    @property
    def num_patches(self) -> int:
        f, t = self.grid_size
        return f * t


PRESETS: dict[str, M2DConfig] = {
    # Small enough to learn the built-in data on 2 CPU cores in a few minutes.
    "tiny": M2DConfig(crop_frames=192, embed_dim=192, depth=4, num_heads=3,
                      predictor_dim=128, predictor_depth=2, predictor_heads=4,
                      text_dim=384),
    # The paper's ViT-Base, 10 s input (m2d_clap_vit_base-80x1001p16x16p16k...).
    "base": M2DConfig(),
    "large": M2DConfig(embed_dim=1024, depth=24, num_heads=16),
}


DEFAULT_NORM_STATS = (-7.1, 4.2)  # log-mel mean and std of the 2022 M2D models (files without norm_stats)
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "pos_embed", "blocks.", "norm.", "norm_stats")  # the audio encoder
# The CLAP temperature's floor, logits at most about 100 x cosine: the literal 4.6052 of the authors'
# clip_logit_scale (clap/clap_only.py, also stage 2's starting value), not log(100) = 4.6051702.
MAX_LOGIT_SCALE = 4.6052


def preset(name: str, **overrides) -> M2DConfig:
    """A named configuration, optionally with some fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# -----------------------------------------------------------------------------
# Fixed 2-D sin-cos position tables (the MAE recipe)


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[L] positions -> [L, embed_dim]: sin of half the channels, cos of the other half."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega                                    # [D/2]
    angles = positions.double()[:, None] * omega[None, :]         # [L, D/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)         # [L, D]


def sincos_2d(embed_dim: int, grid_f: int, grid_t: int, cls_token: bool = True) -> torch.Tensor:
    """[1 + F*T, D] table in frequency-major patch order, zero row first for CLS.

    As in MAE, the first half of the channels encodes the time (column) index and
    the second half the frequency (row) index.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    f_idx, t_idx = torch.meshgrid(torch.arange(grid_f), torch.arange(grid_t), indexing="ij")
    table = torch.cat([sincos_1d(embed_dim // 2, t_idx.flatten()),  # [F*T, D/2] time
                       sincos_1d(embed_dim // 2, f_idx.flatten())],  # [F*T, D/2] frequency
                      dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()


def crop_pos_table(table: torch.Tensor, grid_f: int, grid_t: int, t_used: int) -> torch.Tensor:
    """Keep the first t_used time columns of a [1, 1 + F*T, D] table (for shorter inputs)."""
    if t_used == grid_t:
        return table
    if t_used > grid_t:
        raise ValueError(f"input has {t_used} time patches but the position table holds {grid_t}")
    cls, patches = table[:, :1], table[:, 1:]
    patches = patches.reshape(1, grid_f, grid_t, -1)[:, :, :t_used]  # [1, F, T', D]
    return torch.cat([cls, patches.reshape(1, grid_f * t_used, -1)], dim=1)


# -----------------------------------------------------------------------------
# Transformer layers, in the order data meets them


def init_layer(m: nn.Module):
    """MAE initialisation: xavier-uniform Linear weights, zero biases, LayerNorm weight 1, bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)



class PatchEmbed(nn.Module):
    """[B, 1, F_bins, T_frames] -> [B, F*T, D], token index = f * T + t."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                     # [B, D, F, T]
        return x.flatten(2).transpose(1, 2)  # [B, F*T, D], frequency-major


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, n_queries: int | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with n_queries, only the first n_queries tokens attend: [B, n, D].

        key_mask [B, L] (bool): the tokens that serve as keys and values (the
        others, a short clip's padding, are seen by no token); None: all.
        """
        B, L, D = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)        # 3 x [B, H, L, D/H]
        if n_queries is not None:
            q = q[:, :, :n_queries]                           # [B, H, n, D/H]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, L]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, n or L, D/H]
        return self.proj(x.transpose(1, 2).reshape(B, -1, D))  # [B, n or L, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, n_queries: int | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, D] -> [B, L, D]; with n_queries, the outputs of the first n_queries tokens only.

        The other tokens still serve as keys and values, so those outputs are
        exactly the first n_queries rows of the full output, at O(L) cost.
        key_mask [B, L]: the tokens that serve as keys and values (Attention).
        """
        x = (x if n_queries is None else x[:, :n_queries]) + self.attn(self.norm1(x), n_queries, key_mask)
        return x + self.mlp(self.norm2(x))


# -----------------------------------------------------------------------------
# CLAP heads


class SemanticAudioProjector(nn.Module):
    """2025 audio projector: a learned semantic token attends to the patch features.

    The token (zeros at init) is prepended to the patch features, pre-norm
    blocks with a single head mix them (one block with MLP ratio 1 in the
    paper; released ablations have 1 to 4 blocks, MLP ratio 2 from 3 blocks
    on), and the token's output through a LayerNorm is the CLAP audio
    embedding. The patches carry no position here, so their order is
    irrelevant. Only the token's output is kept, so the last block computes
    that one row: the cost grows linearly with the number of patches, which
    matters for a 30-minute clip's 56,000 patches.
    """

    def __init__(self, dim: int, depth: int = 1):
        super().__init__()
        if not 1 <= depth <= 4:
            raise ValueError(f"the semantic projector has 1 to 4 blocks, got {depth}")
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sem_blocks = nn.ModuleList([Block(dim, num_heads=1, mlp_ratio=1.0 if depth <= 2 else 2.0,
                                               norm_eps=1e-5) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.apply(init_layer)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.sem_token.expand(patches.shape[0], -1, -1), patches], dim=1)  # [B, 1+N, D]
        for block in self.sem_blocks[:-1]:
            x = block(x)
        x = self.sem_blocks[-1](x, n_queries=1)  # [B, 1, D]: the semantic token's output
        return self.norm(x[:, 0])                 # [B, D]


class MLPAudioProjector(nn.Sequential):
    """2024 audio projector: mean of the patch features, then Linear-ReLU-Linear."""

    def __init__(self, dim: int):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return super().forward(patches.mean(dim=1))  # [B, N, D] -> [B, D]


def make_text_proj(kind: str, text_dim: int, dim: int) -> nn.Module:
    """Map a text feature [B, text_dim] to the audio width D.

    "linear" is a Linear with a bias (text_proj.weight, text_proj.bias);
    "mlp" is Linear-ReLU-Linear (text_proj.0.*, text_proj.2.*); "none" is the
    identity, for text features already D wide (GTE-base or BERT-base into
    ViT-Base).
    """
    if kind == "linear":
        return nn.Linear(text_dim, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(text_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    if kind == "none":
        if text_dim != dim:
            raise ValueError(f"text_proj='none' needs text_dim == embed_dim, got {text_dim} and {dim}")
        return nn.Identity()
    raise ValueError(f"unknown text_proj {kind!r}; choose 'linear', 'mlp' or 'none'")


# -----------------------------------------------------------------------------
# Masking


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None):
    """Per clip, a random permutation of patch indices split into visible and masked.

    Every clip of the batch keeps the same number of visible patches,
    int(N * (1 - mask_ratio)). Both index sets are sorted so that each keeps
    grid order. Returns
        ids_visible  [B, Nv]
        ids_masked   [B, Nm]
        ids_restore  [B, N]: position of each grid patch in cat(visible, masked),
                     used to unshuffle the predictor's sequence back to grid order.
    """
    num_visible = int(num_patches * (1 - mask_ratio))
    if generator is None:  # not passed as None: torch.compile cannot trace that with a symbolic batch size
        noise = torch.rand(batch, num_patches, device=device)
    else:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = noise.argsort(dim=1)                                 # [B, N]
    ids_visible = ids_shuffle[:, :num_visible].sort(dim=1).values      # [B, Nv]
    ids_masked = ids_shuffle[:, num_visible:].sort(dim=1).values       # [B, Nm]
    ids_restore = torch.cat([ids_visible, ids_masked], dim=1).argsort(dim=1)  # [B, N]
    return ids_visible, ids_masked, ids_restore


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, N, D] tokens, [B, K] indices -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# -----------------------------------------------------------------------------
# The audio encoder: one path from log-mel to patch features, for every use


class AudioEncoder(nn.Module):
    """The ViT audio encoder: normalisation, patch embedding, positions, CLS, blocks, final norm.

    The one encoder path of this file: M2DCLAP (pre-training, features) and
    AudioClassifier (fine-tuning) both extend it, so patch embedding,
    position table, block loop (with gradient checkpointing) and norm exist
    once. Its parameters keep the released key names (patch_embed.proj,
    cls_token, pos_embed, blocks.{i}, norm, norm_stats).
    """

    def __init__(self, config: M2DConfig, norm_stats: tuple[float, float] = DEFAULT_NORM_STATS):
        super().__init__()
        self.config = config
        D = config.embed_dim
        grid_f, grid_t = config.grid_size
        if grid_f < 1 or grid_t < 1:
            raise ValueError(f"input {config.n_mels}x{config.crop_frames} is smaller than one "
                             f"{config.patch_size}x{config.patch_size} patch")
        # Log-mel normalisation statistics travel with the weights (key "norm_stats").
        self.register_buffer("norm_stats", torch.tensor(norm_stats, dtype=torch.float32))
        self.patch_embed = PatchEmbed(config.patch_size, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.register_buffer("pos_embed", sincos_2d(D, grid_f, grid_t)[None])  # [1, 1+N, D]
        self.blocks = nn.ModuleList([Block(D, config.num_heads, config.mlp_ratio)
                                     for _ in range(config.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def normalize(self, log_mel: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std with the stored scalar statistics."""
        return (log_mel - self.norm_stats[0]) / self.norm_stats[1]

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, F_bins, T_frames] normalised log-mel -> [B, N, D] patches with positions.

        T may be shorter than config.crop_frames (the position table is
        cropped to the first columns), never longer.
        """
        patches = self.patch_embed(x)  # [B, F*T', D]
        grid_f, grid_t = self.config.grid_size
        t_used = x.shape[-1] // self.config.patch_size
        pos = crop_pos_table(self.pos_embed, grid_f, grid_t, t_used)
        return patches + pos[:, 1:]

    def _with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)  # [B, 1+K, D]

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks in turn; with grad_checkpointing, activations are recomputed in backward."""
        for block in blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, None, key_mask, use_reentrant=False)
            else:
                x = block(x) if key_mask is None else block(x, key_mask=key_mask)
        return x

    def encode_tokens(self, patches: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks on patch tokens that carry their positions: [B, K, D] -> [B, 1+K, D] (CLS first).

        key_mask [B, K] (bool): the patch tokens that serve as keys (the CLS
        token always does); the others are seen by no token. None: all.
        """
        if key_mask is not None:
            key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], 1), key_mask], dim=1)  # [B, 1+K]
        return self.norm(self._run_blocks(self.blocks, self._with_cls(patches), key_mask))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder without masking: [B, 1, F, T] log-mel -> [B, 1+N, D]."""
        return self.encode_normalized(self.normalize(x))

    def encode_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder without masking on an already normalised log-mel: [B, 1, F, T] -> [B, 1+N, D]."""
        return self.encode_tokens(self.embed_patches(x))


# -----------------------------------------------------------------------------
# M2D-CLAP: the encoder with its M2D training parts and CLAP heads


class M2DCLAP(AudioEncoder):
    """The M2D-CLAP audio encoder (the online encoder) with its M2D training parts and CLAP heads.

    text_encoder (stages 2 and 2.1) is any module called as
    text_encoder(input_ids=..., attention_mask=...) whose first output is the
    token features [B, L, text_dim], such as a Hugging Face BertModel; without
    it, the text input is a precomputed sentence embedding [B, text_dim].
    """

    def __init__(self, config: M2DConfig, norm_stats: tuple[float, float] = DEFAULT_NORM_STATS,
                 text_encoder: nn.Module | None = None):
        super().__init__(config, norm_stats)  # the online encoder
        D, Dp = config.embed_dim, config.predictor_dim
        grid_f, grid_t = config.grid_size

        # Target encoder: its own blocks and norm, updated only by EMA. It shares
        # the patch embedding, position table and CLS token with the online one.
        self.target_blocks = nn.ModuleList([Block(D, config.num_heads, config.mlp_ratio)
                                            for _ in range(config.depth)])
        self.target_norm = nn.LayerNorm(D, eps=1e-6)

        # Predictor, named "decoder" as in MAE and the released checkpoints.
        self.decoder_embed = nn.Linear(D, Dp)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dp))
        self.register_buffer("decoder_pos_embed", sincos_2d(Dp, grid_f, grid_t)[None])  # [1, 1+N, Dp]
        self.decoder_blocks = nn.ModuleList([Block(Dp, config.predictor_heads, config.mlp_ratio)
                                             for _ in range(config.predictor_depth)])
        self.decoder_norm = nn.LayerNorm(Dp, eps=1e-6)
        self.decoder_pred = nn.Linear(Dp, D)

        self.initialize_weights()

        # CLAP heads, made after the MAE initialisation as the authors do: the MLP
        # projectors keep PyTorch's default Linear init, the semantic projector
        # initialises itself, and a pretrained text encoder keeps its weights.
        if config.audio_proj == "semantic":
            self.audio_proj = SemanticAudioProjector(D, config.audio_proj_depth)
        elif config.audio_proj == "mlp":
            self.audio_proj = MLPAudioProjector(D)
        else:
            raise ValueError(f"unknown audio_proj {config.audio_proj!r}; choose 'semantic' or 'mlp'")
        self.text_proj = make_text_proj(config.text_proj, config.text_dim, D)
        if config.text_pooling not in ("cls", "mean"):
            raise ValueError(f"unknown text_pooling {config.text_pooling!r}; choose 'cls' or 'mean'")
        self.text_encoder = text_encoder
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for p in self.target_parameters():
            p.requires_grad_(False)

    # --- initialisation (MAE recipe) -----------------------------------------

    def initialize_weights(self):
        # The patch projection is initialised like a Linear on its flattened weight.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_layer)

    # --- the steps of M2D -----------------------------------------------------

    def forward_online(self, patches: torch.Tensor, ids_visible: torch.Tensor) -> torch.Tensor:
        """Online encoder on the visible patches: [B, N, D] -> [B, 1+Nv, D] (CLS first)."""
        return self.encode_tokens(gather_tokens(patches, ids_visible))

    @torch.no_grad()
    def forward_target(self, patches: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Target encoder on the masked patches: [B, N, D] -> [B, Nm, D] (CLS dropped)."""
        x = self._with_cls(gather_tokens(patches, ids_masked))
        return self.target_norm(self._run_blocks(self.target_blocks, x))[:, 1:]

    def forward_predictor(self, online: torch.Tensor, ids_restore: torch.Tensor,
                          ids_masked: torch.Tensor) -> torch.Tensor:
        """Predict the target features of the masked patches: -> [B, Nm, D].

        The visible features are mapped to the predictor width, mask tokens fill
        the masked positions, the sequence is put back in grid order and given
        positions, and the outputs at the masked positions are returned in the
        order of ids_masked (the order of the target's inputs).
        """
        x = self.decoder_embed(online)                                      # [B, 1+Nv, Dp]
        cls, visible = x[:, :1], x[:, 1:]
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, N - visible.shape[1], -1)  # [B, Nm, Dp]
        x = gather_tokens(torch.cat([visible, mask_tokens], dim=1), ids_restore)  # [B, N, Dp] grid order
        grid_f, grid_t = self.config.grid_size
        pos = crop_pos_table(self.decoder_pos_embed, grid_f, grid_t, N // grid_f)
        x = torch.cat([cls, x], dim=1) + pos                                # [B, 1+N, Dp]
        x = self.decoder_pred(self.decoder_norm(self._run_blocks(self.decoder_blocks, x)))  # [B, 1+N, D]
        return gather_tokens(x[:, 1:], ids_masked)                          # [B, Nm, D]

    def forward(self, x: torch.Tensor, text, frozen_encoder: bool = False,
                token_drop: float = 0.0) -> tuple[torch.Tensor, ...]:
        """One training forward pass: forward_m2d_clap (stage 1) or, with frozen_encoder, forward_clap.

        The choice is an argument of forward, not two entry points, so that a
        DistributedDataParallel or compiled wrapper sees every pass.
        """
        return self.forward_clap(x, text, token_drop) if frozen_encoder else self.forward_m2d_clap(x, text)

    def forward_m2d_clap(self, x: torch.Tensor, text) -> tuple[torch.Tensor, ...]:
        """Stage 1: M2D on the masked input, and CLAP audio from the visible patches.

        x: [B, 1, F_bins, T_frames] log-mel (normalised here with norm_stats);
        text: sentence embeddings [B, text_dim] (or tokens, see text_features).
        Returns (prediction, target, audio_embed, text_embed): [B, Nm, D] twice,
        then [B, D] twice.
        """
        patches = self.embed_patches(self.normalize(x))                     # [B, N, D]
        ids_visible, ids_masked, ids_restore = random_masking(
            patches.shape[0], patches.shape[1], self.config.mask_ratio, patches.device)
        online = self.forward_online(patches, ids_visible)                  # [B, 1+Nv, D]
        prediction = self.forward_predictor(online, ids_restore, ids_masked)
        target = self.forward_target(patches, ids_masked)
        audio_embed = self.audio_proj(online[:, 1:])                        # [B, D]
        return prediction, target, audio_embed, self.text_features(text)

    def forward_clap(self, x: torch.Tensor, text, token_drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 2 and 2.1: CLAP parts on the frozen encoder -> (audio_embed, text_embed), [B, D] each.

        No masking, target or predictor: the encoder runs without autograd,
        and only the CLAP parts see gradients. While the audio projector
        trains, token_drop > 0 passes the encoder's input patches through the
        structured token drop (stage 2: 0.3, the authors' training_mask), so
        the projector learns from random subsets of frequency rows and time
        columns; in eval mode the encoder always sees the whole input.
        """
        with torch.no_grad():
            patches = self.embed_patches(self.normalize(x))                 # [B, N, D]
            if token_drop > 0 and self.audio_proj.training:
                grid_f, grid_t = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
                patches, _ = structured_token_drop(patches, grid_f, grid_t, token_drop)  # [B, K, D]
            patches = self.encode_tokens(patches)[:, 1:]                    # [B, K, D], CLS dropped
        return self.audio_proj(patches), self.text_features(text)

    # --- inference ------------------------------------------------------------

    def text_features(self, text) -> torch.Tensor:
        """CLAP text features [B, D] before L2 normalisation.

        text: sentence embeddings [B, text_dim], or, with a text encoder, a dict
        of token tensors with input_ids and attention_mask [B, L]. The encoder's
        feature is its first (CLS) token, as for the paper's BERT, or the mean
        over the real tokens (config.text_pooling); it is not L2-normalised
        before the text projector.
        """
        if self.text_encoder is None:
            return self.text_proj(text)
        tokens = self.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"])[0]
        if self.config.text_pooling == "cls":
            return self.text_proj(tokens[:, 0])                          # [B, L, H] -> [B, D]
        return self.text_proj(mean_pool(tokens, text["attention_mask"]))  # [B, L, H] -> [B, D]

    def encode_audio(self, x: torch.Tensor) -> torch.Tensor:
        """CLAP audio embedding in the shared space: [B, 1, F, T] log-mel -> [B, D], unit length."""
        return F.normalize(self.audio_proj(self.encode(x)[:, 1:]), dim=-1)

    def encode_text(self, text) -> torch.Tensor:
        """CLAP text embedding in the shared space: -> [B, D], unit length (see text_features)."""
        return F.normalize(self.text_features(text), dim=-1)

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep the logit scale parameter in [0, 4.6052] (log 100 as the authors write it), after every step.

        Clamping the parameter, not its use in the loss, keeps its gradient
        alive at the ceiling, as the authors' training does.
        """
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    # --- EMA target -----------------------------------------------------------

    def online_parameters(self) -> list[torch.Tensor]:
        return [*self.blocks.parameters(), *self.norm.parameters()]

    def target_parameters(self) -> list[torch.Tensor]:
        return [*self.target_blocks.parameters(), *self.target_norm.parameters()]

    @torch.no_grad()
    def ema_update(self, decay: float | torch.Tensor):
        """target <- decay * target + (1 - decay) * online, as fused foreach ops.

        decay may be a 0-d tensor on the parameters' device: a decay of 1
        leaves the target exactly as it is, so a step can be skipped without
        the host reading a flag.
        """
        targets = self.target_parameters()
        torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, torch._foreach_mul(self.online_parameters(), 1 - decay))

    # --- stages 2 and 2.1: the CLAP parts train on the frozen encoder ---------

    def clap_modules(self) -> list[nn.Module]:
        """The parts that stages 2 and 2.1 train (the logit scale trains too)."""
        return [m for m in (self.audio_proj, self.text_proj, self.text_encoder) if m is not None]

    def freeze_encoder(self):
        """Freeze everything but the CLAP parts: the audio encoder, target and predictor."""
        self.requires_grad_(False)
        for module in self.clap_modules():
            module.requires_grad_(True)
        self.logit_scale.requires_grad_(True)

    def train_clap(self):
        """Training mode for the CLAP parts only; the frozen encoder stays in eval mode."""
        self.eval()
        for module in self.clap_modules():
            module.train()
        return self

    # --- optimiser ------------------------------------------------------------

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups by the authors' rule (timm's param_groups_weight_decay): no decay for tensors of
        one dimension or fewer (norms, biases, the logit scale) and for biases; everything else decays,
        the CLS, mask and semantic tokens ([1, 1, D]) included.

        Their 2025 stage-2 program calls this rule; their stage-1 program tries timm's older
        add_weight_decay first, which with timm 0.4.5 tests len(shape) == 1 and so would also decay
        the 0-d logit scale, and falls back to this rule on the timm versions that lack it.
        """
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]


def mean_pool(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token features [B, L, H] over the real (unpadded) tokens -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # [B, L, 1]
    return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)




# -----------------------------------------------------------------------------
# The model shape of a state dict (ours or a released M2D / M2D-CLAP file)


VIT_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}  # by the timm/MAE size names


def config_from_state_dict(state: dict, n_mels: int = 80, crop_frames: int | None = None,
                           num_heads: int | None = None, predictor_heads: int = 16) -> M2DConfig:
    """The M2DConfig whose state dict has these tensors (released key names, prefixes removed).

    Widths, depths, the MLP ratio, the predictor and the kind of each CLAP
    projector come from the tensors. What the tensors cannot tell is passed
    in: the input size (crop_frames defaults to whole patches of the position
    table, which loses the 9 unused frames of an 80 x 1001 model), the head
    counts (default one head per 64 channels, as every ViT size has).
    """
    patch = state["patch_embed.proj.weight"].shape[-2:]
    if patch[0] != patch[1]:
        raise ValueError(f"patches of {tuple(patch)} are not square; only square patches are supported")
    patch_size, dim = int(patch[0]), state["cls_token"].shape[-1]
    grid_f = n_mels // patch_size
    grid_t = (state["pos_embed"].shape[1] - 1) // grid_f

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    config = dict(n_mels=n_mels, crop_frames=crop_frames or grid_t * patch_size, patch_size=patch_size,
                  embed_dim=dim, depth=count("blocks."), num_heads=num_heads or dim // 64,
                  mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim)
    if "decoder_embed.weight" in state:
        config.update(predictor_dim=state["decoder_embed.weight"].shape[0],
                      predictor_depth=count("decoder_blocks."), predictor_heads=predictor_heads)
    if "audio_proj.0.weight" in state:
        config["audio_proj"] = "mlp"
    elif "audio_proj.sem_token" in state:
        config.update(audio_proj="semantic", audio_proj_depth=count("audio_proj.sem_blocks."))
    if "text_proj.weight" in state:
        config.update(text_proj="linear", text_dim=state["text_proj.weight"].shape[1])
    elif "text_proj.0.weight" in state:
        hidden = state["text_proj.0.weight"].shape[0]
        if hidden != dim:
            raise ValueError(f"an MLP text projector with a {hidden}-wide hidden layer; this model's MLP "
                             f"projector is {dim} wide, as the authors'")
        config.update(text_proj="mlp", text_dim=state["text_proj.0.weight"].shape[1])
    else:  # no projector: the text feature is already D wide (GTE-base or BERT-base into ViT-Base)
        config.update(text_proj="none", text_dim=dim)
    return M2DConfig(**config)


# -----------------------------------------------------------------------------
# Fine-tuning: longer inputs and the structured token drop


def stretch_pos_table(table: torch.Tensor, grid_f: int, grid_t_old: int, grid_t_new: int) -> torch.Tensor:
    """A checkpoint's [1, 1 + F*T_old, D] position table for an input of T_new time patches.

    Longer input (a 6-s model fine-tuned on 10 s): the table is STRETCHED along
    time by bicubic interpolation (align_corners=False, no antialiasing), not
    rebuilt as a new sin-cos table; the frequency axis keeps its size, so its
    rows pass through unchanged. Shorter input: the first T_new columns.
    The CLS row stays first, untouched.
    """
    if grid_t_new <= grid_t_old:
        return crop_pos_table(table, grid_f, grid_t_old, grid_t_new)
    cls, patches = table[:, :1], table[:, 1:]
    D = table.shape[-1]
    grid = patches.reshape(1, grid_f, grid_t_old, D).permute(0, 3, 1, 2)           # [1, D, F, T_old]
    grid = F.interpolate(grid.float(), size=(grid_f, grid_t_new), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, grid_f * grid_t_new, D)          # [1, F*T_new, D]
    return torch.cat([cls, patches.to(table.dtype)], dim=1)


def structured_drop_counts(grid_f: int, grid_t: int, ratio: float, u: float) -> tuple[int, int]:
    """(NF, NT): how many frequency rows and time columns a batch flags, from one uniform u in [0, 1).

    NF = min(F - 1, int(F (r + 1/F) u)) rows (never all of them); the columns
    make up the rest of the ratio: NT = int(T max(r + 0.5/T - NF/F, 0)).
    """
    nf = min(grid_f - 1, int(grid_f * (ratio + 1.0 / grid_f) * u))
    nt = int(grid_t * max(ratio + 0.5 / grid_t - nf / grid_f, 0.0))
    return nf, nt


def structured_drop_flags(batch: int, grid_f: int, grid_t: int, ratio: float,
                          generator: torch.Generator | None = None, u: float | None = None,
                          device=None) -> torch.Tensor:
    """[B, F, T] bool: per clip, NF random frequency rows and NT random time columns flagged.

    NF and NT are drawn once per batch (u uniform in [0, 1), or given), so
    every clip has the same number of unflagged positions. Each clip's rows
    are the NF smallest of F uniform draws (a uniformly random subset), its
    columns likewise: one draw for the whole batch, on the host generator.
    """
    if u is None:
        u = float(torch.rand(1, generator=generator))
    nf, nt = structured_drop_counts(grid_f, grid_t, ratio, u)
    rows = torch.rand(batch, grid_f, generator=generator).argsort(dim=1).argsort(dim=1) < nf   # [B, F]
    cols = torch.rand(batch, grid_t, generator=generator).argsort(dim=1).argsort(dim=1) < nt   # [B, T]
    return (rows[:, :, None] | cols[:, None, :]).to(device)


def kept_token_ids(flags: torch.Tensor, keep: str = "flagged") -> torch.Tensor:
    """[B, F, T] flags -> [B, K] indices (f * T + t) of the tokens kept; K = unflagged count.

    keep="flagged" (default) reproduces the authors' code, which produced the
    published fine-tuning figures: it sorts the flags in DESCENDING order and
    keeps the first K, so the flagged rows and columns are kept first and
    unflagged tokens fill the remaining places (for 5 x 62 at ratio 0.5:
    155, 172, 168 or 124 tokens for NF = 0, 1, 2, 3). keep="unflagged" keeps
    exactly the unflagged tokens, the apparent intent of a "drop". Ties keep
    grid order here (a stable sort), our choice: the authors'
    torch.argsort(descending=True) is not stable on the CPU (on a GPU, rows
    longer than 32 elements sort stably), so which tied tokens fill the places
    left over may differ from theirs, never how many.
    """
    if keep not in ("flagged", "unflagged"):
        raise ValueError(f"keep must be 'flagged' (the authors' behaviour) or 'unflagged', got {keep!r}")
    flat = flags.flatten(1).to(torch.int8)                                              # [B, F*T]
    n_keep = int((~flags[0]).sum())
    order = flat.sort(dim=1, descending=(keep == "flagged"), stable=True).indices       # [B, F*T]
    return order[:, :n_keep]                                                            # [B, K]


def structured_token_drop(tokens: torch.Tensor, grid_f: int, grid_t: int, ratio: float,
                          generator: torch.Generator | None = None, keep: str = "flagged",
                          u: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured token drop on patch tokens [B, F*T, D] (no CLS) -> (kept [B, K, D], ids [B, K]).

    The fine-tuning augmentation of the authors' "training_mask" (ratio 0.5
    in fine-tuning, 0.3 in stage 2): whole frequency rows and time columns are
    flagged at random, the same count for the whole batch, and K tokens are
    kept per clip (see kept_token_ids for which). Training only.
    """
    if tokens.shape[1] != grid_f * grid_t:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {grid_f} x {grid_t} grid")
    flags = structured_drop_flags(tokens.shape[0], grid_f, grid_t, ratio, generator, u, tokens.device)
    ids = kept_token_ids(flags, keep)
    return gather_tokens(tokens, ids), ids


# -----------------------------------------------------------------------------
# The fine-tuning network: the encoder, the structured token drop, pooling and a linear head


class AudioClassifier(AudioEncoder):
    """The audio encoder with a classification head, as the authors fine-tune it (their EVAR TaskNetwork).

    Input: a normalised (and augmented) log-mel [B, 1, F_bins, T] with T at
    most config.crop_frames; shorter input is zero-padded to it (after
    normalisation: SPCV2's 101 frames become 112). While training, the
    structured token drop keeps K of the F*T patch tokens (token_drop_ratio,
    which tokens: kept_token_ids). The clip feature is the mean of the kept
    patch tokens (feature="mean", D) or, with feature="stacked", the F rows of
    each time column stacked and averaged over time (F*D; needs every token).
    Given each clip's own length (clip_feature's frames), the padding's
    columns are masked out of attention and the average instead.
    The head is BatchNorm1d(feature, affine=False), then Linear (weight normal
    std 0.01 drawn from `generator`, bias 0). State-dict keys: the encoder's
    (pos_embed holds the task's stretched table, a buffer: never trained),
    then head_norm.* and head.*.
    """

    def __init__(self, config: M2DConfig, n_classes: int, norm_stats: tuple[float, float] = DEFAULT_NORM_STATS,
                 token_drop_ratio: float = 0.0, token_drop_keep: str = "flagged", feature: str = "mean",
                 generator: torch.Generator | None = None):
        super().__init__(config, norm_stats)
        if feature not in ("mean", "stacked"):
            raise ValueError(f"feature must be 'mean' or 'stacked', got {feature!r}")
        if feature == "stacked" and token_drop_ratio > 0:
            raise ValueError("stacked column features need every token: set token_drop_ratio to 0 "
                             "(the authors switch to mean features whenever the drop is on)")
        self.token_drop_ratio, self.token_drop_keep, self.feature = token_drop_ratio, token_drop_keep, feature
        grid_f = config.grid_size[0]
        dim = config.embed_dim * (grid_f if feature == "stacked" else 1)
        self.head_norm = nn.BatchNorm1d(dim, affine=False)
        self.head = nn.Linear(dim, n_classes)
        nn.init.normal_(self.head.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_encoder(cls, encoder: AudioEncoder, n_classes: int, frames: int, grad_checkpointing: bool = False,
                     **options) -> "AudioClassifier":
        """A classifier for `frames`-long input on a pre-trained encoder (the head is new).

        The encoder's weights and statistics are copied; its position table is
        stretched (or cropped) to the input's time patches (stretch_pos_table).
        The predictor, target and CLAP heads of an M2DCLAP are left behind.
        options: AudioClassifier's (token drop, feature, generator).
        """
        config = replace(encoder.config, crop_frames=frames, grad_checkpointing=grad_checkpointing)
        model = cls(config, n_classes, tuple(encoder.norm_stats.tolist()), **options)
        grid_f, grid_t = config.grid_size
        state = {k: v for k, v in encoder.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
        state["pos_embed"] = stretch_pos_table(encoder.pos_embed.detach(), grid_f,
                                               (encoder.pos_embed.shape[1] - 1) // grid_f, grid_t)
        model.load_state_dict(state, strict=False)  # the head keeps its initialisation
        return model.to(encoder.norm_stats.device)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                frames: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised log-mel [B, 1, F_bins, T] -> logits [B, n_classes]; `generator` draws the token drop,
        `frames` [B] (optional) are the clips' own lengths (clip_feature)."""
        return self.head(self.head_norm(self.clip_feature(x, generator, frames)))

    def clip_feature(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     frames: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised log-mel [B, 1, F_bins, T] -> the feature the head reads [B, D] (or [B, F*D]).

        frames [B] (optional): how many of the T frames are each clip's own.
        Then the rest is zeroed, the time columns it fills alone are seen by
        no token (attention's key mask) and the feature averages the clip's
        own columns only: a 1-s clip in a 4-s input reads as it does alone,
        as the frozen encoder's features (features.clip_features) read it.
        Without, every column counts, the padding's too (the authors' way).
        """
        length = self.config.crop_frames
        if x.shape[-1] > length:
            raise ValueError(f"input of {x.shape[-1]} frames; this model takes at most {length}")
        grid_f, grid_t = self.config.grid_size
        columns = None
        if frames is not None:
            x = x.masked_fill(torch.arange(x.shape[-1], device=x.device) >= frames.view(-1, 1, 1, 1), 0.0)
            own = -(-frames // self.config.patch_size)                               # [B] columns, partly own included
            columns = torch.arange(grid_t, device=x.device) < own.view(-1, 1)        # [B, T]
        patches = self.embed_patches(F.pad(x, (0, length - x.shape[-1])))  # [B, F*T, D], zeros after normalisation
        if self.training and self.token_drop_ratio > 0:
            if columns is not None:
                raise ValueError("the token drop needs every token: pass no frames, or set token_drop_ratio to 0")
            patches, _ = structured_token_drop(patches, grid_f, grid_t, self.token_drop_ratio, generator,
                                               self.token_drop_keep)  # [B, K, D]
        key_mask = None if columns is None else columns.repeat(1, grid_f)            # [B, F*T], frequency-major
        tokens = self.encode_tokens(patches, key_mask)[:, 1:]                        # [B, K, D], CLS dropped
        return self.pool(tokens, columns)

    def pool(self, tokens: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """[B, K, D] -> [B, D] (mean), or [B, F*T, D] -> [B, F*D] (stacked columns, mean over time).

        columns [B, T] (bool, optional): the time columns the mean is taken over (the clip's own).
        """
        grid_f = self.config.grid_size[0]
        if columns is None:
            if self.feature == "mean":
                return tokens.mean(dim=1)
            return stacked_columns(tokens, grid_f).mean(dim=1)
        weights = (columns / columns.sum(dim=1, keepdim=True)).unsqueeze(-1).to(tokens.dtype)  # [B, T, 1]
        stacked = (stacked_columns(tokens, grid_f) * weights).sum(dim=1)                      # [B, F*D]
        if self.feature == "mean":
            return stacked.view(tokens.shape[0], grid_f, -1).mean(dim=1)                     # [B, D]
        return stacked


def stacked_columns(tokens: torch.Tensor, grid_f: int) -> torch.Tensor:
    """Patch tokens [B, F*T, D] in frequency-major order -> per time column, the F rows stacked: [B, T, F*D]."""
    B, N, D = tokens.shape
    columns = tokens.reshape(B, grid_f, N // grid_f, D).permute(0, 2, 1, 3)  # [B, T, F, D]
    return columns.reshape(B, N // grid_f, grid_f * D)


# -----------------------------------------------------------------------------
# Captioning: a sequence-to-sequence language model reading the frozen encoder's frame features


class CaptionPrefix(nn.Module):
    """What the language model's encoder reads instead of word embeddings.

    Each frame feature (a 160 ms time column, its F patch features stacked:
    F*D) is layer-normalised and projected to the model's width W. With
    clap_dim > 0 the clip's CLAP audio embedding, L2-normalised and projected,
    comes first as one more token (EnCLAP's sequence-level CLAP prefix).
    """

    def __init__(self, frame_dim: int, width: int, clap_dim: int = 0):
        super().__init__()
        self.frame_norm = nn.LayerNorm(frame_dim)
        self.frame_proj = nn.Linear(frame_dim, width)
        self.clap_proj = nn.Linear(clap_dim, width) if clap_dim else None

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor,
                clap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, T, F*D], frame_mask [B, T] (True: a real column), clap [B, D_clap] -> ([B, S, W], [B, S])."""
        x = self.frame_proj(self.frame_norm(frames))                              # [B, T, W]
        if self.clap_proj is None:
            return x, frame_mask.long()
        prefix = self.clap_proj(F.normalize(clap, dim=-1))[:, None]              # [B, 1, W]
        mask = torch.cat([frame_mask.new_ones(frame_mask.shape[0], 1), frame_mask], dim=1)
        return torch.cat([prefix, x], dim=1), mask.long()                        # [B, 1+T, W], [B, 1+T]


class AudioCaptioner(nn.Module):
    """CaptionPrefix, then a sequence-to-sequence language model that writes the caption.

    language_model is transformers' BartForConditionalGeneration, or any
    module called the same way (inputs_embeds, attention_mask,
    decoder_input_ids, encoder_outputs, use_cache; its output has .logits and
    get_encoder() its encoder). The decoder starts from start_id and stops at
    eos_id. Padded frame columns are hidden from the encoder and from the
    decoder's cross-attention by the attention mask; the decoder is causal.
    """

    def __init__(self, prefix: CaptionPrefix, language_model: nn.Module, start_id: int, eos_id: int):
        super().__init__()
        self.prefix, self.language_model = prefix, language_model
        self.start_id, self.eos_id = start_id, eos_id

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor, clap: torch.Tensor | None,
                decoder_inputs: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: decoder_inputs [B, L] (start_id, then the caption shifted right) -> logits [B, L, V]."""
        x, mask = self.prefix(frames, frame_mask, clap)
        return self.language_model(inputs_embeds=x, attention_mask=mask, decoder_input_ids=decoder_inputs,
                                   use_cache=False).logits

    def encode(self, frames: torch.Tensor, frame_mask: torch.Tensor,
               clap: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The language model's encoder output [B, S, W] and its mask [B, S], computed once per clip."""
        x, mask = self.prefix(frames, frame_mask, clap)
        return self.language_model.get_encoder()(inputs_embeds=x, attention_mask=mask)[0], mask

    def next_log_probs(self, memory: torch.Tensor, mask: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [N, V] of the token after each prefix [N, L], all N reading memory [1, S, W]."""
        n = prefixes.shape[0]
        logits = self.language_model(encoder_outputs=(memory.expand(n, -1, -1),), attention_mask=mask.expand(n, -1),
                                     decoder_input_ids=prefixes, use_cache=False).logits   # [N, L, V]
        return logits[:, -1].float().log_softmax(dim=-1)

    @torch.no_grad()
    def generate(self, frames: torch.Tensor, frame_mask: torch.Tensor, clap: torch.Tensor | None,
                 beam_width: int, max_tokens: int) -> list[list[int]]:
        """A caption's token ids (start and end left out) for each clip of the batch, by beam_search."""
        memory, mask = self.encode(frames, frame_mask, clap)
        return [beam_search(lambda p, i=i: self.next_log_probs(memory[i:i + 1], mask[i:i + 1], p), self.start_id,
                            self.eos_id, beam_width, max_tokens, frames.device) for i in range(frames.shape[0])]


def beam_search(next_log_probs, start_id: int, eos_id: int, beam_width: int, max_tokens: int,
                device: torch.device | None = None) -> list[int]:
    """The highest-scoring token sequence found by beam search; its score is the mean log-probability per token.

    next_log_probs(prefixes [N, L]) -> [N, V]. Every step extends each of
    the beam_width live sequences by every token and keeps the beam_width
    best extensions that do not end; those that end (eos_id) are set aside.
    The search stops when beam_width sequences have ended, or after
    max_tokens tokens (the live ones then count as they stand). The mean
    over tokens (the end token included) keeps short captions from winning
    merely for being short. Returns the tokens after start_id, without eos_id.
    """
    live = [([start_id], 0.0)]                                   # (tokens, summed log-probability)
    ended = []
    for _ in range(max_tokens):
        prefixes = torch.tensor([tokens for tokens, _ in live], device=device)  # [N, L]
        log_probs = next_log_probs(prefixes)                                     # [N, V]
        totals = log_probs + torch.tensor([score for _, score in live], device=log_probs.device)[:, None]
        best = totals.flatten().topk(min(2 * beam_width, totals.numel()))
        extended = []
        for score, k in zip(best.values.tolist(), best.indices.tolist()):
            n, token = divmod(k, totals.shape[1])
            (ended if token == eos_id else extended).append((live[n][0] + [token], score))
        live = extended[:beam_width]
        if len(ended) >= beam_width or not live:
            break
    tokens, _ = max(ended + live, key=lambda t: t[1] / (len(t[0]) - 1))
    return [t for t in tokens[1:] if t != eos_id]
