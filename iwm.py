"""
iwm.py: an action-conditioned JEPA image world model for Minecraft-style video, in one file.

What it is. A world model answers "if I press these keys and move the mouse like this, what
will I see next?". This one answers in latent space (a JEPA):

    frame t --encoder--> tokens z_t --action_conditioner(last 25 actions)--> --predictor--> z_t+1
    frame t+1 --target_encoder (EMA copy of the encoder)--> target tokens; loss = MSE per token

and feeds its own predictions back for a few steps (a short open-loop rollout) so long
rollouts do not drift. A diffusion decoder, trained in the same run on detached latents (it
never shapes them), turns latents back into pictures so people can watch the predictions:

    noise --decoder(latent tokens, diffusion time t)--> Euler steps --> frame

Notable choices (each fixes a fault of the system we reproduce, see shared/docs/design.md):
  - every one of the 25 action tokens has its own temporal position (not an unordered bag)
  - the target encoder is an EMA copy in eval mode, momentum 0.996 -> 1.0, saved in checkpoints
  - latents are layer-normalised over the feature axis (no affine) and the loss is per token
  - pixels are normalised to [-1, 1] on the device; actions are scaled in one place (scale_actions)
  - the predictor predicts a change to the current latent (starts as "copy the last latent")
  - mixed precision, gradient clipping, no weight decay on norms, biases and positions
  - every eval reports pred/copy per horizon, action sensitivity and the collapse watch
  - the decoder is a real diffusion model (rectified flow, DiT with adaLN-Zero), not a
    pixel regressor, and puts each latent token's content into that token's own patch

Shape legend: B batch, S frames in a window (rollout + 1), R rollout steps, N tokens per frame,
D width, E decoder width, K action window (25), A action columns, H/W pixels, p patch size.

Commands:
    python prepare_data.py --synthetic 64       # the built-in world's quickstart dataset
    python iwm.py --steps 1500                  # train (tiny preset on CPU, base on a GPU)
    python iwm.py --steps 3000 --resume         # continue the run in --out_dir up to step 3000
    python iwm.py --decoder_only runs/iwm/ckpt.pt --steps 1500   # a new decoder, frozen world model
    python iwm.py --size base --bench 20        # time 20 steps on random data: FLOP/s, memory
    torchrun --nproc_per_node=4 iwm.py --steps 3000   # one process per GPU (DistributedDataParallel)
    python iwm.py --help                        # every flag, generated from Config below

Reading order: config -> helpers -> attention and blocks -> encoder -> action conditioner ->
predictor -> diffusion decoder -> world model, loss and EMA -> data -> evaluation ->
using the world model (probes, surprise, CEM planning) -> checkpoints -> training (with
torchrun) -> benchmark -> main.
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from prepare_data import ACTION_COLUMNS, load_dataset

# -----------------------------------------------------------------------------
# Config: one dataclass, every field a flag (--steps 3000 --size tiny)


@dataclass
class Config:
    # --- model (a --size preset sets these; flags override) ---
    size: str = "auto"               # tiny | small | base; auto: base on a CUDA GPU, tiny on CPU
    image_size: int = 64             # pixels (square); frames of another size are resized on the device
    patch_size: int = 8              # pixels per patch side; N = (image_size / patch_size)^2 tokens
    width: int = 128                 # D, token width of every part
    heads: int = 4                   # attention heads
    encoder_depth: int = 4           # transformer blocks in the encoder
    encoder_mlp_ratio: float = 4.0   # MLP hidden width / D
    conditioner_depth: int = 2       # cross-attention blocks: frame tokens attend to action tokens
    conditioner_mlp_ratio: float = 4.0
    predictor_depth: int = 4         # transformer blocks in the predictor
    predictor_mlp_ratio: float = 4.0
    decoder_width: int = 128         # the diffusion decoder's token width (it has its own size)
    decoder_depth: int = 4           # DiT blocks in the decoder
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    # --- data ---
    data: str = "data/builtin"       # a dataset folder made by prepare_data.py
    frame_skip: int = 4              # raw frames per model step (VPT is 20 fps: 4 -> 0.2 s)
    action_window: int = 25          # K: per-frame actions the conditioner sees for one step
    # --- training ---
    steps: int = 3000                # optimizer steps in total (--resume continues up to this)
    batch_size: int = 32             # windows per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    rollout: int = 2                 # R: open-loop prediction steps in the loss (V-JEPA 2-AC uses 2+)
    lr: float = 1e-3                 # peak learning rate (AdamW)
    decoder_lr_scale: float = 10.0   # decoder lr = lr * this. Its latent-to-pixel map is badly
                                     # conditioned: after 600 steps 17.8 dB at 1x, 20.3 dB at 10x
    min_lr_ratio: float = 0.1        # the cosine schedule ends at lr * this
    warmup_steps: int = 200          # linear warmup from 0 to lr
    weight_decay: float = 0.05       # on weight matrices only
    grad_clip: float = 1.0           # max global gradient norm
    ema_start: float = 0.996         # target encoder momentum at step 0 (I-JEPA)
    ema_end: float = 1.0             # ... rising linearly to this at the last step
    decoder_on_predicted: float = 0.0  # share of decoder examples conditioned on the predictor's
                                     # own (detached) outputs instead of target latents. Measured
                                     # (README): 0.5 made decoded predictions and reconstructions
                                     # worse than 0 on the quickstart world model, so 0 it is
    decoder_only: str = ""           # a world-model checkpoint: freeze it, train only the decoder
    sample_steps: int = 10           # Euler steps when the decoder draws a frame (more: slower, finer)
    dtype: str = "auto"              # float32 | bfloat16 | float16 (autocast); auto: see choose_dtype
    grad_ckpt: bool = False          # activation checkpointing: recompute each block's activations
                                     # in the backward pass instead of storing them (less memory)
    compile: bool = False            # torch.compile each part (slow first steps, then faster)
    bench: int = 0                   # > 0: time this many training steps on random data and exit
    device: str = "auto"             # cpu | cuda | auto
    seed: int = 0
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 500            # steps between validation lines
    eval_windows: int = 256          # validation windows (from validation episodes only)
    eval_horizon: int = 8            # pred/copy is reported for h = 1..this
    eval_psnr_windows: int = 32      # of those, windows whose frames the decoder draws for PSNR
    ckpt_every: int = 500            # steps between checkpoints
    out_dir: str = "runs/iwm"        # checkpoint, log and resolved config go here
    resume: bool = False             # continue from <out_dir>/ckpt.pt


# Presets: model sizes, with the batch and learning rate that suit them. `base` matches the
# original system's parameter counts (encoder ~114M, action conditioner ~43M, predictor ~213M,
# decoder ~141M) within 5%; test_iwm.py counts them.
PRESETS = {
    # learns the built-in world on a 2-core CPU in minutes (the quickstart)
    "tiny": dict(image_size=64, patch_size=8, width=128, heads=4, encoder_depth=4,
                 conditioner_depth=2, predictor_depth=4, batch_size=32, grad_accum=1, lr=1e-3),
    "small": dict(image_size=64, patch_size=8, width=256, heads=8, encoder_depth=6,
                  conditioner_depth=3, predictor_depth=6, decoder_width=256, decoder_depth=6,
                  decoder_heads=8, batch_size=32, grad_accum=1, lr=6e-4),
    # the original's shapes: 224 px, patch 16 (196 tokens), width 768, 12 heads, encoder 16 blocks.
    # The original's conditioner had 16 cross-attention layers without MLPs; ours has MLPs, so
    # 6 blocks give the same ~43M. Its predictor had 12 blocks with MLP x12 (~198M by our count
    # of its description, short of its reported 213M): MLP x13 lands on 213M.
    # The original's decoder: 12 blocks, width 768, 8 heads, MLP x8 (~141M), with no timestep
    # conditioning. Ours adds adaLN-Zero (6 D^2 per block), so MLP x5 keeps it near: ~146M.
    # Memory for a 12 GB GPU (python iwm.py --size base --bench 1 ..., see README): fp32 weights,
    # gradients and AdamW moments take 8.13 GiB; the activations of a micro-batch of 8 take
    # 5.2 GiB without activation checkpointing (too much) and 0.35 GiB with it.
    "base": dict(image_size=224, patch_size=16, width=768, heads=12, encoder_depth=16,
                 conditioner_depth=6, predictor_depth=12, predictor_mlp_ratio=13.0,
                 decoder_width=768, decoder_depth=12, decoder_heads=8, decoder_mlp_ratio=5.0,
                 batch_size=8, grad_accum=4, lr=3e-4, grad_ckpt=True),
}
WORLD_MODEL_FIELDS = ["image_size", "patch_size", "width", "heads", "encoder_depth", "encoder_mlp_ratio",
                      "conditioner_depth", "conditioner_mlp_ratio", "predictor_depth", "predictor_mlp_ratio"]
DECODER_FIELDS = ["decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_ratio"]

# -----------------------------------------------------------------------------
# Small helpers

CAMERA_COLUMNS = [ACTION_COLUMNS.index("camera_pitch"), ACTION_COLUMNS.index("camera_yaw")]


def scale_actions(actions):
    """The one place where recorded actions become network inputs. Keys and buttons are 0/1
    already. The camera is in degrees per frame: 0.15 for the smallest mouse nudge, up to ~90
    for a flick. asinh(deg / 2) is linear below ~2 degrees and logarithmic above, so both stay
    O(1) and small moves are not drowned by large ones."""
    scaled = actions.clone()
    scaled[..., CAMERA_COLUMNS] = torch.asinh(actions[..., CAMERA_COLUMNS] / 2.0)
    return scaled


def normalize_frames(frames, image_size):
    """uint8 RGB (..., H, W, 3) -> float (..., 3, image_size, image_size) in [-1, 1], on the device."""
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return x.reshape(*lead, 3, image_size, image_size)


def sincos_positions_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding (MAE / I-JEPA): (grid*grid, dim). Half of the
    channels encode the row, half the column, each at dim/4 geometrically spaced frequencies."""
    assert dim % 4 == 0, "width must be divisible by 4 for 2-D sin-cos positions"
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(position):
        angles = position.flatten()[:, None].float() * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)


# -----------------------------------------------------------------------------
# Attention and transformer blocks


class Attention(nn.Module):
    """Multi-head attention. Self-attention when context is None, else x attends to context."""

    def __init__(self, dim, heads):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, D = x.shape
        M = context.shape[1]
        q = self.query(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)        # (B, h, N, D/h)
        k, v = self.key_value(context).view(B, M, 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if x.is_cuda:       # the fused kernel: fast and memory-light on a GPU
            x = F.scaled_dot_product_attention(q, k, v)                                 # (B, h, N, D/h)
        else:               # the same formula spelled out: on CPU the fused kernel's backward is
                            # slow for our short sequences (small preset: 1.3 s -> 1.1 s per step)
            weights = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(dim=-1)   # (B, h, N, M)
            x = weights @ v                                                             # (B, h, N, D/h)
        return self.out(x.transpose(1, 2).reshape(B, N, D))                             # (B, N, D)


class MLP(nn.Sequential):
    def __init__(self, dim, ratio):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block. With cross=True the attention reads a context sequence
    (the action tokens) instead of x itself."""

    def __init__(self, dim, heads, mlp_ratio, cross=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x, context=None):
        context = None if self.norm_context is None else self.norm_context(context)
        x = x + self.attention(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks, x, *context, checkpoint=False):
    """x through each block in turn. With checkpoint (--grad_ckpt), a block keeps only its input
    for the backward pass and recomputes the rest there: activation memory drops to about one
    tensor per block, for about a third more compute."""
    for block in blocks:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *context, use_reentrant=False)
        else:
            x = block(x, *context)
    return x


# -----------------------------------------------------------------------------
# Encoder: one frame -> latent tokens


class Encoder(nn.Module):
    """ViT: patchify, add fixed 2-D positions, pre-norm blocks, final layer norm without affine.

    The final norm has no learnable scale or shift, so its output lives in the same space as the
    training target (the target encoder's output is normalised the same way, as in I-JEPA); the
    predictor's outputs can then be fed back in as inputs during rollouts."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        grid = cfg.image_size // cfg.patch_size
        self.register_buffer("positions", sincos_positions_2d(grid, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.encoder_mlp_ratio)
                                    for _ in range(cfg.encoder_depth))
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False)
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, images):                                  # (B, 3, H, W) in [-1, 1]
        x = self.patch_embed(images)                            # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.positions       # (B, N, D)
        x = run_blocks(self.blocks, x, checkpoint=self.grad_ckpt)
        return self.norm(x)                                     # (B, N, D)


# -----------------------------------------------------------------------------
# Action conditioner: frame tokens cross-attend to the last K per-frame actions


class ActionConditioner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.action_embed = nn.Sequential(nn.Linear(len(ACTION_COLUMNS), cfg.width), nn.GELU(),
                                          nn.Linear(cfg.width, cfg.width))
        # One learned embedding per slot of the window: slot K-1 is the most recent action.
        # (The original gave all 25 the same one, so it saw an unordered bag of actions.)
        self.action_positions = nn.Parameter(torch.randn(cfg.action_window, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.conditioner_mlp_ratio, cross=True)
                                    for _ in range(cfg.conditioner_depth))
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, tokens, actions):                        # (B, N, D), (B, K, A) raw actions
        a = self.action_embed(scale_actions(actions))          # (B, K, D)
        a = a + self.action_positions                          # (B, K, D)
        return run_blocks(self.blocks, tokens, a, checkpoint=self.grad_ckpt)   # (B, N, D)


# -----------------------------------------------------------------------------
# Predictor: conditioned tokens -> the tokens of the next model step


class Predictor(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.register_buffer("positions", sincos_positions_2d(grid, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.predictor_mlp_ratio)
                                    for _ in range(cfg.predictor_depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.width)
        # Zero-initialised head: the untrained predictor says "nothing changes" (copy the
        # latent), the baseline every result is compared with, and learns the change from there.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, conditioned, latent):                    # (B, N, D), (B, N, D)
        x = conditioned + self.positions                       # (B, N, D)
        x = run_blocks(self.blocks, x, checkpoint=self.grad_ckpt)
        return latent + self.head(self.norm(x))                # (B, N, D)


# -----------------------------------------------------------------------------
# Diffusion decoder: latent tokens -> pixels, for watching and scoring predictions only.
# Rectified flow (minRF, SD3). Time convention: t = 0 is the data, t = 1 pure noise, and
#     x_t = (1 - t) * x_0 + t * noise,   velocity v = dx_t/dt = noise - x_0.
# Sampling integrates v from t = 1 down to t = 0 with Euler steps.
# The network itself predicts the clean image x_0 and v is derived from it (JiT, "Back to
# Basics", 2025): a velocity contains the noise, which a patch token narrower than its
# patch (128 < 8*8*3 here) cannot carry, while a clean image is easy to squeeze through.
# The loss is the velocity error weighted by t^2, which is exactly the clean-image error:
# every noise level counts the same in pixel space. (Unweighted, the nearly clean end, where
# the task is "copy the input", would weigh up to 1/MIN_T^2 = 400 times more, and the decoder
# learned to read the latent far more slowly: 18 dB instead of 25+ after 1200 steps.)


def rectified_flow_loss(predict_clean, x0):
    """Per-example t^2-weighted velocity MSE (= clean-image MSE), and the t each example got.
    predict_clean(x_t, t) is the model. t ~ logit-normal (sigmoid of a standard normal, SD3):
    mid-range times, where the picture takes shape, are sampled most."""
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    noise = torch.randn_like(x0)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    # t^2 * |v_hat - v|^2 with v_hat = (x_t - x0_hat) / t and v = (x_t - x0) / t:
    return (predict_clean(x_t, t).float() - x0).pow(2).mean(dim=(1, 2, 3)), t


@torch.no_grad()
def rectified_flow_sample(velocity, shape, steps, generator=None, device="cpu"):
    """Start from noise at t = 1 and take `steps` Euler steps of size 1/steps down to t = 0."""
    x = torch.randn(shape, generator=generator, device=device)
    for i in range(steps):
        t = torch.full((shape[0],), 1 - i / steps, device=device)
        x = x - velocity(x, t).float() / steps
    return x


MIN_T = 0.05   # floor of t when a velocity is derived from a predicted clean image


def timestep_embedding(t, dim):
    """Sin-cos features of diffusion time t in [0, 1] (scaled by 1000, as in DiT)."""
    frequencies = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000 * t[:, None].float() * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DecoderBlock(nn.Module):
    """DiT block with adaLN-Zero: the conditioning vector sets each norm's shift and scale and
    gates each residual branch; the gates start at zero, so every block starts as identity."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = MLP(dim, mlp_ratio)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):                                   # (B, N, E), (B, E)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class Decoder(nn.Module):
    """Predicts the clean frame from a noisy one, given the frame's latent tokens.

    Latent token i belongs to image patch i (same grid), so it is added to the i-th noisy
    patch token and read out into patch i: that is where the decoder must draw what it encodes. Their mean, summed with
    the time embedding, conditions every block through adaLN-Zero (DiT's summed vector)."""

    def __init__(self, cfg):
        super().__init__()
        E, p = cfg.decoder_width, cfg.patch_size
        self.patch_size, self.grid = p, cfg.image_size // p
        self.patch_in = nn.Linear(3 * p * p, E)
        self.latent_in = nn.Linear(cfg.width, E)
        self.register_buffer("positions", sincos_positions_2d(self.grid, E), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(256, E), nn.SiLU(), nn.Linear(E, E))
        self.latent_pool = nn.Linear(cfg.width, E)
        self.blocks = nn.ModuleList(DecoderBlock(E, cfg.decoder_heads, cfg.decoder_mlp_ratio)
                                    for _ in range(cfg.decoder_depth))
        self.final_norm = nn.LayerNorm(E, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(E, 2 * E))
        self.patch_out = nn.Linear(E, 3 * p * p)
        # A linear readout from latent token i straight to the pixels of patch i: the latents
        # keep most of their patch linearly (a least-squares readout alone reaches ~33 dB), so
        # this skip draws the picture at once and the blocks learn the rest from the noisy input.
        self.readout = nn.Linear(cfg.width, 3 * p * p)
        self.grad_ckpt = cfg.grad_ckpt
        self.initialize_weights()

    def initialize_weights(self):
        """All special inits in one place (DiT): Xavier-uniform linears, zero biases, then zero
        for every adaLN modulation and the output layer, so the decoder starts predicting 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.patch_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, images):                                # (B, 3, H, W)
        B, p, g = images.shape[0], self.patch_size, self.grid
        x = images.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1)     # (B, g, g, p, p, 3)
        return x.reshape(B, g * g, p * p * 3)                              # (B, N, p*p*3)

    def unpatchify(self, patches):                             # (B, N, p*p*3)
        B, p, g = patches.shape[0], self.patch_size, self.grid
        x = patches.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)    # (B, 3, g, p, g, p)
        return x.reshape(B, 3, g * p, g * p)                               # (B, 3, H, W)

    def forward(self, noisy, t, latent):                       # (B, 3, H, W), (B,), (B, N, D)
        x = self.patch_in(self.patchify(noisy))                # (B, N, E)
        x = x + self.latent_in(latent) + self.positions        # (B, N, E) patch i gets token i
        c = self.time_mlp(timestep_embedding(t, 256)) + self.latent_pool(latent.mean(dim=1))   # (B, E)
        x = run_blocks(self.blocks, x, c, checkpoint=self.grad_ckpt)   # (B, N, E)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        x = self.patch_out(modulate(self.final_norm(x), shift, scale)) + self.readout(latent)  # (B, N, p*p*3)
        return self.unpatchify(x)                              # (B, 3, H, W) predicted clean image

    def velocity(self, noisy, t, latent):
        """v = (x_t - x_0) / t from the predicted x_0; t is floored at MIN_T so the division
        stays tame near the data end (JiT does the same)."""
        clean = self(noisy, t, latent)
        return (noisy - clean) / t.clamp_min(MIN_T)[:, None, None, None]

    def draw(self, latent, steps, generator=None):             # (B, N, D) -> (B, 3, H, W) in [-1, 1]
        size = self.grid * self.patch_size
        images = rectified_flow_sample(lambda x, t: self.velocity(x, t, latent),
                                       (latent.shape[0], 3, size, size), steps, generator, latent.device)
        return images.clamp(-1, 1)


# -----------------------------------------------------------------------------
# The world model: the four parts, the JEPA loss and the EMA update


def jepa_loss(predicted, target):
    """Per-token squared error averaged over the feature axis -> (B, N).

    Reduced over features (D), never over tokens: every token is its own prediction. (The
    original took a norm over the patch axis.) MSE rather than smooth-L1 because pred/copy,
    the number we judge the model by, is a ratio of mean squared errors: the loss optimises
    exactly what is reported. The targets are layer-normalised, so errors are O(1)."""
    return (predicted.float() - target.float()).pow(2).mean(dim=-1)


class WorldModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.action_conditioner = ActionConditioner(cfg)
        self.predictor = Predictor(cfg)
        self.target_encoder = copy.deepcopy(self.encoder)      # EMA copy, never trained directly
        self.target_encoder.requires_grad_(False)
        self.decoder = Decoder(cfg)                            # reads detached latents only

    def train(self, mode=True):
        super().train(mode)
        self.target_encoder.eval()   # important! the target is always in eval mode
        return self

    def _encode_with(self, encoder, frames):                   # (B, S, H, W, 3) uint8
        B, S = frames.shape[:2]
        x = normalize_frames(frames, self.cfg.image_size)       # (B, S, 3, H, W)
        return encoder(x.flatten(0, 1)).unflatten(0, (B, S))    # (B, S, N, D)

    def encode(self, frames):
        """Online-encoder latents of each frame: (B, S, N, D)."""
        return self._encode_with(self.encoder, frames)

    @torch.no_grad()
    def encode_target(self, frames):
        """Target-encoder latents of each frame: (B, S, N, D), never with a gradient."""
        return self._encode_with(self.target_encoder, frames)

    def predict_next(self, latent, actions):                   # (B, N, D), (B, K, A)
        """One model step: the latent of the frame frame_skip frames later."""
        return self.predictor(self.action_conditioner(latent, actions), latent)   # (B, N, D)

    def rollout(self, latent, actions):                        # (B, N, D), (B, R, K, A)
        """Open loop: feed each prediction back in. Returns (B, R, N, D)."""
        predictions = []
        for step in range(actions.shape[1]):
            latent = self.predict_next(latent, actions[:, step])
            predictions.append(latent)
        return torch.stack(predictions, dim=1)

    def forward(self, frames, actions):                        # (B, R+1, H, W, 3), (B, R, K, A)
        """Training loss = JEPA loss (first step from the real frame, then R-1 steps on the
        model's own predictions) + decoder loss. Also returns the parts, for logging."""
        assert frames.shape[1] == actions.shape[1] + 1, "need one more frame than action windows"
        # Step 1: targets from the EMA encoder (no gradient, eval mode)
        targets = self.encode_target(frames[:, 1:])                      # (B, R, N, D)
        # Step 2: encode the start frame, roll out R steps, compare every step
        latent = self.encode(frames[:, :1])[:, 0]                        # (B, N, D)
        predictions = self.rollout(latent, actions)                      # (B, R, N, D)
        world_loss = jepa_loss(predictions, targets).mean()
        # Step 2b: the decoder learns to draw one future frame per window from a detached latent
        # (no decoder gradient reaches the JEPA: DINO-WM and LeWM plan worse when it does).
        # With decoder_on_predicted > 0, that share of examples gets the predictor's own output
        # instead of the target latent: the imperfect latents the decoder sees in rollouts.
        B, R = actions.shape[:2]
        rows, step = torch.arange(B, device=frames.device), torch.randint(R, (B,), device=frames.device)
        use_predicted = torch.rand(B, device=frames.device) < self.cfg.decoder_on_predicted
        condition = torch.where(use_predicted[:, None, None], predictions[rows, step], targets[rows, step]).detach()
        image = normalize_frames(frames[rows, step + 1], self.cfg.image_size)        # (B, 3, H, W)
        decoder_losses, t = rectified_flow_loss(lambda x, t: self.decoder(x, t, condition), image)
        info = {"world_loss": world_loss.detach(), "decoder_losses": decoder_losses.detach(), "decoder_t": t}
        return world_loss + decoder_losses.mean(), info

    @torch.no_grad()
    def update_target(self, momentum):
        """Step 3: target <- momentum * target + (1 - momentum) * encoder."""
        for target, online in zip(self.target_encoder.parameters(), self.encoder.parameters()):
            target.lerp_(online, 1.0 - momentum)


def ema_momentum(step, cfg):
    """Linear ramp ema_start -> ema_end over training (I-JEPA): the target changes ever slower."""
    return cfg.ema_start + (cfg.ema_end - cfg.ema_start) * min(step / max(cfg.steps, 1), 1.0)


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def count_parameters(model):
    """Trainable parameters per part (the target encoder is a copy, listed separately)."""
    parts = ["encoder", "action_conditioner", "predictor", "decoder"]
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in parts}
    counts["target_encoder (EMA copy)"] = sum(p.numel() for p in model.target_encoder.parameters())
    return counts


# -----------------------------------------------------------------------------
# Data: memory-mapped windows of frames and action windows from a prepared dataset


def action_window(actions, end, window):
    """The `window` per-frame actions ending with the last one taken before frame `end`
    (rows end-window .. end-1). Rows before the episode start are "no action" rows (zeros),
    never wrapped around to the episode's end as in the original."""
    start = end - window
    rows = np.zeros((window, actions.shape[1]), np.float32)
    rows[max(0, -start):] = actions[max(start, 0):end]
    return rows


class WindowSampler:
    """Uniformly random windows of `steps` + 1 frames, frame_skip apart, and for each step
    the action window of that transition (design.md, "Time")."""

    def __init__(self, episodes, steps, cfg):
        span = steps * cfg.frame_skip
        self.episodes = [e for e in episodes if len(e["frames"]) > span]
        if not self.episodes:
            raise ValueError(f"no episode is longer than {span} frames ({steps} steps of "
                             f"frame_skip {cfg.frame_skip}): record longer episodes")
        self.steps, self.frame_skip, self.window = steps, cfg.frame_skip, cfg.action_window
        starts_per_episode = torch.tensor([len(e["frames"]) - span for e in self.episodes])
        self.first_start = torch.cumsum(starts_per_episode, 0) - starts_per_episode
        self.total = int(starts_per_episode.sum())

    def window_at(self, episode, start):
        """Frames (S, H, W, 3) uint8 and action windows (steps, K, A) of one window."""
        frame_numbers = start + self.frame_skip * np.arange(self.steps + 1)
        frames = np.asarray(episode["frames"][frame_numbers])   # reads just these frames
        actions = np.stack([action_window(episode["actions"], start + (k + 1) * self.frame_skip, self.window)
                            for k in range(self.steps)])
        return frames, actions

    def sample_positions(self, batch_size, generator):
        """(episode, start frame) of batch_size uniformly random windows."""
        flat = torch.randint(self.total, (batch_size,), generator=generator)
        which = torch.searchsorted(self.first_start, flat, right=True) - 1
        return [(self.episodes[e], int(f - self.first_start[e])) for e, f in zip(which.tolist(), flat)]

    def sample(self, batch_size, generator):
        windows = [self.window_at(episode, start) for episode, start in self.sample_positions(batch_size, generator)]
        frames = torch.from_numpy(np.stack([w[0] for w in windows]))     # (B, S, H, W, 3)
        actions = torch.from_numpy(np.stack([w[1] for w in windows]))    # (B, S-1, K, A)
        return frames, actions


def open_dataset(cfg):
    """Load the dataset index and check it fits this model. Returns (train, val) episodes."""
    index, episodes = load_dataset(cfg.data)
    if index["action_columns"] != ACTION_COLUMNS:
        raise ValueError(f"{cfg.data}: its action columns differ from this code's; "
                         "re-run prepare_data.py to convert it again")
    train = [e for e in episodes if e["split"] == "train"]
    val = [e for e in episodes if e["split"] == "val"]
    if not train or not val:
        raise ValueError(f"{cfg.data}: needs both train and validation episodes "
                         f"(has {len(train)} and {len(val)}); add more episodes")
    return index, train, val


# -----------------------------------------------------------------------------
# Evaluation: the numbers every file reports the same way (design.md, "What works means")


def psnr(images, reference):
    """PSNR in dB per image, for images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE)."""
    mse = (images.float() - reference.float()).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate(model, frames, actions, device, autocast, psnr_windows=0, sample_steps=10, chunk=64):
    """On fixed validation windows: val loss, pred/copy for h = 1..H, action sensitivity
    (error with actions shuffled across windows / with the true ones) and target std.
    With psnr_windows > 0, the decoder also draws the first psnr_windows windows' futures from
    the predicted latents and from the target latents (reconstruction); their PSNR against the
    true frames is reported per horizon, next to that of repeating the start frame. Predictions
    are drawn twice: as samples (sample_steps Euler steps), which commit to one plausible future
    and are sharp, and as the decoder's mean estimate (one step from t = 1), which is blurred
    where the future is uncertain. PSNR rewards the mean; the eye prefers the sample."""
    was_training = model.training
    model.eval()
    horizon = actions.shape[1]
    predicted_error, copy_error, shuffled_error = torch.zeros(3, horizon)
    target_std = []
    psnr_sums = {key: torch.zeros(horizon) for key in
                 ("psnr_prediction", "psnr_prediction_mean", "psnr_reconstruction", "psnr_repeat_start")}
    generator = torch.Generator(device).manual_seed(0)          # the same noise every eval
    for i in range(0, len(frames), chunk):
        f, a = frames[i:i + chunk].to(device), actions[i:i + chunk].to(device)
        with autocast:
            targets = model.encode_target(f).float()                        # (b, H+1, N, D)
            latent = model.encode(f[:, :1])[:, 0]                           # (b, N, D)
            predicted = model.rollout(latent, a).float()                    # (b, H, N, D)
            shuffled = model.rollout(latent, a.roll(1, dims=0)).float()     # another window's actions
        future = targets[:, 1:]
        predicted_error += jepa_loss(predicted, future).mean(-1).sum(0).cpu()
        copy_error += jepa_loss(targets[:, :1], future).mean(-1).sum(0).cpu()   # "nothing changes"
        shuffled_error += jepa_loss(shuffled, future).mean(-1).sum(0).cpu()
        target_std.append(targets[:, 0].std(dim=0).mean().item())           # across the batch
        drawn_here = min(max(psnr_windows - i, 0), len(f))                  # of this chunk's windows
        if drawn_here:
            sums = decoded_psnr(model, f[:drawn_here], targets[:drawn_here], predicted[:drawn_here],
                                autocast, sample_steps, generator)
            for key in psnr_sums:
                psnr_sums[key] += sums[key]
    n = len(frames)
    metrics = {"val_loss": (predicted_error[:model.cfg.rollout].sum() / n / model.cfg.rollout).item(),
               "pred_copy": (predicted_error / copy_error).tolist(),
               "action_sensitivity": (shuffled_error.sum() / predicted_error.sum()).item(),
               "target_std": float(np.mean(target_std))}
    if psnr_windows:
        metrics.update({key: (total / min(psnr_windows, n)).tolist() for key, total in psnr_sums.items()})
    model.train(was_training)
    return metrics


def decoded_psnr(model, frames, targets, predicted, autocast, sample_steps, generator):
    """Per-horizon PSNR sums over these windows (b of them) of the decoded prediction (sampled
    and 1-step mean), the reconstruction, and repeating the start frame, against the truth."""
    b, horizon = predicted.shape[:2]
    with autocast:
        drawn = model.decoder.draw(predicted.flatten(0, 1), sample_steps, generator)
        mean = model.decoder.draw(predicted.flatten(0, 1), 1, generator)
        reconstructed = model.decoder.draw(targets[:, 1:].flatten(0, 1), sample_steps, generator)
    truth = normalize_frames(frames[:, 1:], model.cfg.image_size)          # (b, H, 3, h, w)
    start = normalize_frames(frames[:, :1], model.cfg.image_size)          # (b, 1, 3, h, w)
    return {"psnr_prediction": psnr(drawn.unflatten(0, (b, horizon)), truth).sum(0),
            "psnr_prediction_mean": psnr(mean.unflatten(0, (b, horizon)), truth).sum(0),
            "psnr_reconstruction": psnr(reconstructed.unflatten(0, (b, horizon)), truth).sum(0),
            "psnr_repeat_start": psnr(start, truth).sum(0)}


def format_eval(step, metrics):
    def row(values, digits):
        return " ".join(f"{v:.{digits}f}" for v in values)

    text = (f"step {step}: val loss {metrics['val_loss']:.4f} | pred/copy h=1..{len(metrics['pred_copy'])}: "
            f"{row(metrics['pred_copy'], 2)} | action sensitivity {metrics['action_sensitivity']:.2f} | "
            f"target std {metrics['target_std']:.3f}")
    if "psnr_prediction" in metrics:
        text += (f"\n  PSNR dB h=1..: prediction sample {row(metrics['psnr_prediction'], 1)} | mean "
                 f"{row(metrics['psnr_prediction_mean'], 1)} | repeat start {row(metrics['psnr_repeat_start'], 1)} | "
                 f"reconstruction {row(metrics['psnr_reconstruction'], 1)}")
    if "decoder_loss_by_t" in metrics:
        text += f"\n  decoder loss by t (0-.25-.5-.75-1): {row(metrics['decoder_loss_by_t'], 4)}"
    return text


# -----------------------------------------------------------------------------
# Using the world model: linear probes, surprise, and planning in latent space


POOLINGS = ["mean", "rows+columns"]


@torch.no_grad()
def pooled_latents(model, frames, chunk=256):
    """Feature vectors per frame for probes, two ways: "mean", the encoder's tokens averaged
    over the image (D features); "rows+columns", averaged along each row and along each column
    of the token grid and concatenated (2 * grid * D), which keeps where things are along one
    axis (the horizon's height, say). frames (n, H, W, 3) uint8 -> {pooling: (n, features)}."""
    device = next(model.parameters()).device
    pooled = {name: [] for name in POOLINGS}
    for i in range(0, len(frames), chunk):
        tokens = model.encode(torch.as_tensor(frames[i:i + chunk])[None].to(device))[0].float().cpu()
        grid = tokens.unflatten(1, (model.cfg.image_size // model.cfg.patch_size, -1))   # (n, g, g, D)
        pooled["mean"].append(tokens.mean(dim=1))
        pooled["rows+columns"].append(torch.cat([grid.mean(dim=2).flatten(1), grid.mean(dim=1).flatten(1)], dim=1))
    return {name: torch.cat(parts) for name, parts in pooled.items()}


def fit_ridge(features, targets, l2=1e-3):
    """Linear (ridge) regression on standardised features, solved in closed form:
    W = (X^T X + l2 n I)^-1 X^T (Y - mean Y). Returns a function features -> predictions."""
    features, targets = features.double(), targets.double()
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    offset = targets.mean(0)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(x.T @ x + l2 * len(x) * eye, x.T @ (targets - offset))
    return lambda new: ((new.double() - mean) / std) @ weights + offset


def r_squared(predicted, targets):
    """Per column: 1 - squared error / variance. 1 is perfect; 0 is no better than the mean."""
    targets = targets.double()
    return 1 - (predicted - targets).pow(2).sum(0) / (targets - targets.mean(0)).pow(2).sum(0)


@torch.no_grad()
def surprise(model, frames, actions):
    """How wrong the one-step prediction is at each model step of an episode: frames
    (T+1, H, W, 3), actions (T, K, A) -> (T,) per-token MSE between the prediction from frame t
    and the target latent of frame t+1. A spike means something the actions cannot explain."""
    latents, targets = model.encode(frames[None])[0], model.encode_target(frames[None])[0]
    return jepa_loss(model.predict_next(latents[:-1], actions), targets[1:]).mean(dim=-1)


def cem(cost, mean, std, low, high, iterations=8, population=32, elites=6, keep=3, correlation=0.0,
        generator=None):
    """The cross-entropy method: minimise cost over a box [low, high]. Sample a population
    around mean (Gaussian, std), score every sample, refit mean and std to the best `elites`,
    repeat. cost maps (population, *mean.shape) samples to (population,) costs. With
    correlation > 0 the noise is correlated along the first axis (time, for action sequences):
    each sample shares one offset across it, so steady turns are drawn as often as jittery ones.
    As in iCEM (Pinneri et al. 2020), the best `keep` samples of one iteration join the next
    population, and the best sample is returned rather than the mean: when the elites sit in
    two modes (turn left, turn right), their mean can be worse than either.
    Returns the best sample (the plan) and its cost."""
    kept = mean[None][:0]                                       # no samples carried over yet
    for _ in range(iterations):
        shared = torch.randn((population, 1, *mean.shape[1:]), generator=generator)
        own = torch.randn((population, *mean.shape), generator=generator)
        noise = correlation * shared + math.sqrt(1 - correlation ** 2) * own     # still unit variance
        samples = torch.maximum(torch.minimum(mean + std * noise, high), low)
        samples[0] = mean                                       # keep the current plan in the running,
        samples[1:1 + len(kept)] = kept                         # and the last iteration's best
        costs = cost(samples)
        best = samples[costs.argsort()[:elites]]
        kept = best[:keep]
        mean, std = best.mean(dim=0), best.std(dim=0)
    return best[0], costs.min().item()     # with keep >= 1, the best of all iterations


# What the planner controls, per model step (each held for frame_skip frames): camera yaw and
# pitch in degrees per frame, and the forward key (pressed when > 0.5). The box keeps turns
# within what the training data shows (about 100 degrees per second at most).
PLAN_CONTROLS = ["camera_yaw", "camera_pitch", "forward"]
PLAN_LOW, PLAN_HIGH = torch.tensor([-5.0, -3.0, 0.0]), torch.tensor([5.0, 3.0, 1.0])


def controls_to_rows(controls, frame_skip):
    """(..., T, 3) planner controls -> (..., T * frame_skip, A) per-frame action rows."""
    rows = torch.zeros(*controls.shape[:-1], len(ACTION_COLUMNS))
    for i, name in enumerate(PLAN_CONTROLS):
        value = controls[..., i]
        rows[..., ACTION_COLUMNS.index(name)] = (value > 0.5).float() if name == "forward" else value
    return rows.repeat_interleave(frame_skip, dim=-2)


@torch.no_grad()
def imagine(model, latent, history, rows):
    """Roll out planned per-frame action rows (P, T * frame_skip, A) from one latent (N, D),
    given the K recorded rows before it, history (K, A). Returns latents (P, T, N, D)."""
    K, skip = history.shape[0], model.cfg.frame_skip
    rows = torch.cat([history.expand(len(rows), -1, -1), rows.to(history.device)], dim=1)   # rows may be on the CPU
    steps = (rows.shape[1] - K) // skip
    # step k's window: the K rows before frame (k + 1) * skip, as action_window gives in training
    windows = torch.stack([rows[:, (k + 1) * skip:(k + 1) * skip + K] for k in range(steps)], dim=1)
    return model.rollout(latent.expand(len(rows), -1, -1), windows.to(latent.device))


def plan(model, latent, goal, history, horizon, init=None, generator=None, correlation=0.9, iterations=4,
         **cem_options):
    """Controls (horizon, 3) whose imagined last latent is closest to the goal latent (N, D).
    init: a previous plan to start from (model-predictive control shifts and reuses it).
    correlation 0.9 (time-correlated samples) took turning goals from 60% to 90% in 20 trials;
    4 CEM iterations plan as well as 8 on held-out goals, in half the time; carrying the best
    samples over and returning the best one, with a predictor trained on 6-step rollouts, took
    turning goals from 74% to 82% (README, Planning)."""
    def cost(controls):
        final = imagine(model, latent, history, controls_to_rows(controls, model.cfg.frame_skip))[:, -1]
        return jepa_loss(final, goal.expand_as(final)).mean(dim=-1).float().cpu()

    mean = (PLAN_LOW + PLAN_HIGH).expand(horizon, -1) / 2 if init is None else init
    std = (PLAN_HIGH - PLAN_LOW).expand(horizon, -1) / 2
    return cem(cost, mean, std, PLAN_LOW, PLAN_HIGH, iterations, correlation=correlation, generator=generator,
               **cem_options)


# -----------------------------------------------------------------------------
# Checkpoints: one self-describing file, written atomically, loadable with weights_only=True


class CheckpointError(Exception):
    pass


def save_checkpoint(path, model, optimizer, scaler, step, cfg, rng_per_rank, digests=None):
    """rng_per_rank: each process's random state (torch, sampler, cuda), rank 0's first;
    digests: each process's weights_digest, kept as a record that the processes agreed."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
             "rng": rng_per_rank[0]}
    if len(rng_per_rank) > 1:
        state["rng_per_rank"], state["rank_digests"] = rng_per_rank, digests
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)      # a crash while saving never touches the last good checkpoint


def load_checkpoint(path):
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no checkpoint there (train one first with `python iwm.py`, "
                              "or give the path of the run's ckpt.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(e).__name__}: {e}); "
                              "it is truncated or not a checkpoint of this project") from None
    missing = {"model", "config", "step"} - set(state) if isinstance(state, dict) else {"everything"}
    if missing:
        raise CheckpointError(f"{path} is not an iwm.py checkpoint (missing {sorted(missing)})")
    return state


def check_same_model(saved, cfg, path, fields=WORLD_MODEL_FIELDS + DECODER_FIELDS):
    """A checkpoint only loads into a model of the same shape: say which fields differ."""
    differ = {k: (saved.get(k), getattr(cfg, k)) for k in fields if saved.get(k) != getattr(cfg, k)}
    if differ:
        listing = ", ".join(f"{k}: checkpoint {a} vs requested {b}" for k, (a, b) in differ.items())
        raise CheckpointError(f"{path} holds a different model ({listing}); drop those flags or "
                              "use another --out_dir")


def load_world_model(model, path):
    """Decoder-only training: the encoders, conditioner and predictor come from a checkpoint
    and are frozen; the decoder (whatever its size) starts fresh."""
    state = load_checkpoint(path)
    check_same_model(state["config"], model.cfg, path, WORLD_MODEL_FIELDS)
    load_model_state(model, state, path, without_decoder=True)
    for part in (model.encoder, model.action_conditioner, model.predictor):
        part.requires_grad_(False)
    print(f"world model loaded from {path} and frozen; training only the decoder")


def load_model_state(model, state, path, without_decoder=False):
    """Load weights, or say which parameters are missing, unexpected or of another shape.
    With without_decoder, the decoder's weights are neither loaded nor checked."""
    def kept(weights):
        return {k: v for k, v in weights.items() if not (without_decoder and k.startswith("decoder."))}

    expected, saved = kept(model.state_dict()), kept(state["model"])
    problems = [f"missing {k}" for k in expected if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in expected]
    problems += [f"{k} is {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} here"
                 for k, v in expected.items() if k in saved and saved[k].shape != v.shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path} does not fit this model: {'; '.join(problems[:3])}{more}. "
                              "Was it written by another version of iwm.py?")
    model.load_state_dict(saved, strict=not without_decoder)


# -----------------------------------------------------------------------------
# Training


def choose_device(cfg):
    if cfg.device != "auto":
        return cfg.device, "as asked"
    if torch.cuda.is_available():
        return "cuda", f"found {torch.cuda.get_device_name()}"
    return "cpu", "no CUDA GPU found"


def choose_dtype(cfg, device):
    """Autocast dtype. On a GPU: bf16 where supported (Ampere and later, e.g. the RTX 3060),
    else fp16 with a gradient scaler. On a CPU: bf16 only if it measurably speeds up matmuls
    here (it does on CPUs with AVX512-BF16 or AMX, and slows down others)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), "as asked"
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this GPU supports bf16"
        return torch.float16, "this GPU lacks bf16; fp16 with a gradient scaler"
    speedup = cpu_bf16_speedup()
    if speedup > 1.3:
        return torch.bfloat16, f"bf16 matmuls measured {speedup:.1f}x faster than fp32 on this CPU"
    return torch.float32, f"bf16 matmuls measured only {speedup:.1f}x fp32's speed on this CPU"


def cpu_bf16_speedup(size=512, repeats=20):
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            a @ b                                   # warm up
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds[dtype] = time.perf_counter() - start
    return seconds[torch.float32] / seconds[torch.bfloat16]


def optimizer_and_scaler(model, cfg, device_type, dtype):
    """AdamW over parameter_groups (fused into one kernel on a GPU: no temporary copies of all
    the weights), and a gradient scaler that only acts for float16."""
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device_type == "cuda")
    return optimizer, torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


def autocast_to(device_type, dtype):
    """Mixed precision in dtype; float32 means none."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def parameter_groups(model, cfg):
    """Weight decay on weight matrices only: not on norms, biases or position embeddings.
    The decoder's groups carry a learning-rate scale (cfg.decoder_lr_scale)."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and "positions" not in name
            scale = cfg.decoder_lr_scale if name.startswith("decoder.") else 1.0
            group = groups.setdefault((decay, scale), {"params": [], "lr_scale": scale,
                                                       "weight_decay": cfg.weight_decay if decay else 0.0})
            group["params"].append(p)
    return list(groups.values())


class Distributed:
    """One process per GPU (or CPU process) under torchrun, which sets RANK, WORLD_SIZE and
    LOCAL_RANK; a plain `python iwm.py` is rank 0 of 1 and nothing here does anything.
    PyTorch's DistributedDataParallel averages the gradients across processes in backward, so
    every rank takes the same optimizer step and its weights (and so its EMA target) stay equal."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank, self.local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        if self.size > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)

    def device(self, device):
        return f"cuda:{self.local_rank}" if device == "cuda" and self.size > 1 else device

    def wrap(self, model, device):
        if self.size == 1:
            return model
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.local_rank] if device != "cpu" else None)

    def mean_and_any(self, values, flag):
        """Average floats over the ranks and OR a flag: one small all-reduce per step, so every
        rank logs the same loss, sees a NaN together and stops together."""
        if self.size == 1:
            return values, flag
        t = torch.tensor([*values, float(flag)], dtype=torch.float64)
        dist.all_reduce(t)
        return [v / self.size for v in t[:-1].tolist()], t[-1].item() > 0

    def gather(self, obj):
        """A list with every rank's obj (on every rank)."""
        if self.size == 1:
            return [obj]
        objects = [None] * self.size
        dist.all_gather_object(objects, obj)
        return objects

    def close(self):
        if self.size > 1:
            dist.destroy_process_group()


def weights_digest(module):
    """A fingerprint of a module's exact weights, to check that ranks agree bit for bit."""
    digest = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def compile_parts(model):
    """torch.compile each part (each a plain tensor function); the loops around them stay eager."""
    for part in (model.encoder, model.target_encoder, model.action_conditioner, model.predictor, model.decoder):
        part.compile()


def train(cfg):
    """Train (or resume) a world model as cfg says. Returns (model, the last evaluation's metrics)."""
    ranks = Distributed()
    main_rank = ranks.rank == 0
    say = print if main_rank else (lambda *args, **kwargs: None)      # only rank 0 talks and writes
    device, device_reason = choose_device(cfg)
    device = ranks.device(device)
    device_type = device.split(":")[0]
    dtype, dtype_reason = choose_dtype(cfg, device_type)
    say(f"device: {device} ({device_reason}); precision: {dtype} ({dtype_reason})"
        + (f"; {ranks.size} processes, {ranks.size * cfg.batch_size * cfg.grad_accum} windows per step"
           if ranks.size > 1 else ""))
    torch.manual_seed(cfg.seed)
    index, train_episodes, val_episodes = open_dataset(cfg)
    sampler = WindowSampler(train_episodes, cfg.rollout, cfg)
    val_frames, val_actions = WindowSampler(val_episodes, cfg.eval_horizon, cfg).sample(
        cfg.eval_windows, torch.Generator().manual_seed(1234))    # the same windows every time
    say(f"data: {cfg.data}: {len(train_episodes)} train / {len(val_episodes)} val episodes, "
        f"{index['resolution']}px" + (f" (resized to {cfg.image_size} on the device)"
                                      if index["resolution"] != cfg.image_size else ""))

    model = WorldModel(cfg).to(device)      # the same seed, so the same initial weights everywhere
    for part, n in count_parameters(model).items():
        say(f"  {part}: {n / 1e6:.2f}M parameters")
    if cfg.decoder_only:
        load_world_model(model, cfg.decoder_only)
    if ranks.rank:
        torch.manual_seed(cfg.seed + ranks.rank)            # each rank its own diffusion noise
    optimizer, scaler = optimizer_and_scaler(model, cfg, device_type, dtype)
    autocast = autocast_to(device_type, dtype)
    generator = torch.Generator().manual_seed(cfg.seed + ranks.rank)   # each rank its own windows
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step = 0
    if cfg.resume:
        state = load_checkpoint(ckpt_path)
        load_model_state(model, state, ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        saved_rng = state.get("rng_per_rank", [state["rng"]])      # one per process that saved it
        if len(saved_rng) != ranks.size:
            say(f"note: {ckpt_path} was saved by {len(saved_rng)} processes, not {ranks.size}; the random "
                "streams start afresh (training continues, but not bit for bit as an unbroken run)")
        else:
            rng = saved_rng[ranks.rank]
            torch.set_rng_state(rng["torch"])
            generator.set_state(rng["sampler"])
            if device_type == "cuda" and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
        step = state["step"]
        say(f"resumed from {ckpt_path} at step {step}")
    if cfg.compile:
        compile_parts(model)
    trained = ranks.wrap(model, device)                     # model itself on one process
    log = None
    if main_rank:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")

    def checkpoint():
        """Every rank hands rank 0 its random state and a digest of its weights; rank 0 checks
        the digests agree and writes the file."""
        digests = ranks.gather({"weights": weights_digest(model), "ema_target": weights_digest(model.target_encoder)})
        rng = ranks.gather({"torch": torch.get_rng_state(), "sampler": generator.get_state(),
                            "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else []})
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"step {step}: the processes' weights differ: {digests}")
        if main_rank:
            save_checkpoint(ckpt_path, model, optimizer, scaler, step, cfg, rng, digests)

    # Ctrl-C asks to stop: the current step finishes, then the run is saved, so a resumed run
    # continues exactly as if nothing had happened. A second Ctrl-C quits at once.
    stop = []

    def request_stop(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("stopping after this step (Ctrl-C again quits without saving)")

    previous_handler = signal.signal(signal.SIGINT, request_stop)
    metrics, speeds = {}, []
    decoder_by_t = torch.zeros(2, 4)       # sums and counts of decoder loss in 4 bins of t
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not main_rank)
    stopping = False
    try:
        while step < cfg.steps and not stopping:
            started = time.perf_counter()
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss_sum = world_sum = 0.0
            for micro in range(cfg.grad_accum):
                frames, actions = sampler.sample(cfg.batch_size, generator)
                last = micro == cfg.grad_accum - 1      # DDP averages gradients on the last one only
                with trained.no_sync() if ranks.size > 1 and not last else contextlib.nullcontext():
                    with autocast:
                        loss, info = trained(frames.to(device), actions.to(device))
                    scaler.scale(loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                world_sum += info["world_loss"].item() / cfg.grad_accum
                time_bin = (info["decoder_t"] * 4).long().clamp(max=3).cpu()   # loss by diffusion time
                decoder_by_t[0].index_add_(0, time_bin, info["decoder_losses"].float().cpu())
                decoder_by_t[1].index_add_(0, time_bin, torch.ones(len(time_bin)))
            (loss_sum, world_sum), stopping = ranks.mean_and_any([loss_sum, world_sum], bool(stop))
            if not math.isfinite(loss_sum):
                raise FloatingPointError(
                    f"loss became {loss_sum} at step {step}; stopping without saving, so "
                    f"{ckpt_path} still holds the last good state. Try a lower --lr or --dtype float32.")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if not cfg.decoder_only:                 # a frozen world model keeps its target
                model.update_target(ema_momentum(step, cfg))
            step += 1
            seconds = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(world=f"{world_sum:.4f}", decoder=f"{loss_sum - world_sum:.4f}", step_s=f"{seconds:.2f}")
            speeds.append(ranks.size * cfg.batch_size * cfg.grad_accum / seconds)
            record = {"step": step, "loss": loss_sum, "world_loss": world_sum, "decoder_loss": loss_sum - world_sum,
                      "lr": lr, "grad_norm": grad_norm.item(), "samples_per_s": speeds[-1]}
            if main_rank and (step % cfg.eval_every == 0 or step == cfg.steps):
                metrics = evaluate(model, val_frames, val_actions, device, autocast,
                                   cfg.eval_psnr_windows, cfg.sample_steps)
                metrics["decoder_loss_by_t"] = (decoder_by_t[0] / decoder_by_t[1].clamp_min(1)).tolist()
                decoder_by_t.zero_()
                record.update(metrics)
                tqdm.write(format_eval(step, metrics))
            if main_rank:
                log.write(json.dumps(record) + "\n")
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
                checkpoint()
                if main_rank:
                    log.flush()
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        if log:
            log.close()
        ranks.close()
    if speeds:
        say(f"{len(speeds)} steps: median {np.median(speeds):.1f} samples/s ({cfg.size}, {dtype})")
    if stopping:
        say(f"interrupted: saved step {step} to {ckpt_path}; continue with --resume")
        raise SystemExit(130)
    return model, metrics


# -----------------------------------------------------------------------------
# Benchmark: --bench N times N training steps of the chosen preset on random data


def matmul_peak(device, dtype, size=4096, repeats=10):
    """The device's measured matmul peak in FLOP/s: the best of `repeats` square matmuls in the
    training precision (the ceiling a training step's FLOP/s is compared with)."""
    if device == "cpu":
        size, repeats = 2048, 5
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    autocast = autocast_to(device.split(":")[0], dtype)
    best = math.inf
    with autocast:
        for _ in range(repeats + 1):                      # the first is a warm-up
            synchronize(device)
            started = time.perf_counter()
            a @ b
            synchronize(device)
            best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark(cfg):
    """Print parameters per part, samples/s, FLOP/s (counted by PyTorch's FlopCounterMode on
    one step: matmuls, convolutions, attention, forward and backward, recomputation included),
    the fraction of the measured matmul peak, and peak memory."""
    device, device_reason = choose_device(cfg)
    device_type = device.split(":")[0]
    dtype, dtype_reason = choose_dtype(cfg, device_type)
    print(f"benchmark: {cfg.size} preset, {cfg.bench} steps of batch {cfg.batch_size} x {cfg.grad_accum} "
          f"on random data; device {device} ({device_reason}); precision {dtype} ({dtype_reason}); "
          f"grad_ckpt {cfg.grad_ckpt}, compile {cfg.compile}")
    torch.manual_seed(cfg.seed)
    model = WorldModel(cfg).to(device).train()
    for part, n in count_parameters(model).items():
        print(f"  {part}: {n / 1e6:.2f}M parameters")
    optimizer, scaler = optimizer_and_scaler(model, cfg, device_type, dtype)
    autocast = autocast_to(device_type, dtype)
    frames = torch.randint(0, 256, (cfg.batch_size, cfg.rollout + 1, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8, device=device)
    actions = torch.randn(cfg.batch_size, cfg.rollout, cfg.action_window, len(ACTION_COLUMNS), device=device)

    def step():
        for _ in range(cfg.grad_accum):
            with autocast:
                loss, _ = model(frames, actions)
            scaler.scale(loss / cfg.grad_accum).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(cfg.ema_start)

    with FlopCounterMode(display=False) as counter:       # counts one step, before compiling
        step()
    flops_per_step = counter.get_total_flops()
    activations = saved_activation_bytes(model, frames, actions, autocast)
    if cfg.compile:
        compile_parts(model)
    for _ in range(3 if cfg.compile else 1):              # warm-up (and compilation)
        step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    started = time.perf_counter()
    for _ in tqdm(range(cfg.bench), desc="bench", unit="step", leave=False):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / cfg.bench
    peak = matmul_peak(device, dtype)
    achieved = flops_per_step / seconds
    print(f"  {cfg.batch_size * cfg.grad_accum / seconds:.1f} samples/s ({seconds:.3f} s per step)")
    print(f"  {flops_per_step / 1e12:.3f} TFLOP per step -> {achieved / 1e12:.3f} TFLOP/s achieved")
    print(f"  measured {dtype} matmul peak {peak / 1e12:.3f} TFLOP/s -> {achieved / peak:.1%} of peak")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states = (4 * sum(p.numel() for p in model.parameters()) + 12 * trainable) / 2 ** 30
    print(f"  memory budget: weights, gradients and AdamW's two moments in fp32 {states:.2f} GiB; "
          f"activations kept for backward {activations / 2 ** 30:.2f} GiB per micro-batch "
          f"(measured with saved-tensor hooks); sum {states + activations / 2 ** 30:.2f} GiB")
    if device.startswith("cuda"):
        memory = torch.cuda.max_memory_allocated() / 2 ** 30
        print(f"  peak CUDA memory (max allocated): {memory:.2f} GiB on {torch.cuda.get_device_name()}")
    else:
        memory = None
        print("  peak memory: not measured on CPU (CUDA's max allocated needs a GPU)")
    return {"samples_per_s": cfg.batch_size * cfg.grad_accum / seconds, "flops_per_step": flops_per_step,
            "flops_per_s": achieved, "peak_flops_per_s": peak, "fraction_of_peak": achieved / peak,
            "peak_memory_gib": memory, "states_gib": states, "activations_gib": activations / 2 ** 30}


def saved_activation_bytes(model, frames, actions, autocast):
    """Bytes of the tensors autograd keeps from one forward pass for the backward pass (weights
    not counted; each storage once). With --grad_ckpt a checkpointed block keeps only its input,
    which is counted as one tensor per block."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        model(frames, actions)
    return sum(kept.values())


# -----------------------------------------------------------------------------
# Main: flags generated from Config; preset, then explicit flags, then the resolved config


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description="Train the JEPA image world model.")
    for f in dataclasses.fields(Config):
        if f.type is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=None, help=f"default: {f.default}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return resolve_config(given)


def resolve_config(given):
    """Config from explicit flags: on --resume the checkpoint's config, else the size preset,
    then the flags on top (model-shape flags may not contradict a checkpoint)."""
    cfg = Config(**{k: v for k, v in given.items() if k in ("out_dir", "resume", "device")})
    if cfg.resume:
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        saved = load_checkpoint(path)["config"]
        check_same_model(saved, Config(**{**saved, **given}), path)
        return Config(**{**saved, **given})
    if given.get("decoder_only"):
        saved = load_checkpoint(given["decoder_only"])["config"]
        world = {k: saved[k] for k in WORLD_MODEL_FIELDS + ["size", "data", "frame_skip", "action_window"]}
        out_dir = os.path.join(os.path.dirname(given["decoder_only"]), "decoder")  # keep the source intact
        return Config(**{**PRESETS[saved["size"]], **world, "out_dir": out_dir, **given})
    size = given.get("size", "auto")
    if size == "auto":
        size = "base" if choose_device(cfg)[0] == "cuda" else "tiny"
        print(f"size: {size} (base on a CUDA GPU, tiny on CPU; pick with --size)")
    if size not in PRESETS:
        raise SystemExit(f"--size {size}: choose one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[size], **given, "size": size})


def main(argv=None):
    try:
        cfg = parse_config(argv)
        if int(os.environ.get("RANK", 0)) == 0:
            print("config: " + json.dumps(dataclasses.asdict(cfg)))
        if cfg.bench:
            benchmark(cfg)
        else:
            train(cfg)
    except (CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
