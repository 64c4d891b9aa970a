"""
iwm.py: an action-conditioned JEPA image world model for Minecraft-style video, in one file.

A world model answers "if I press these keys and move the mouse like this, what will I see
next?". This one answers in latent space (a JEPA), and a diffusion decoder, trained on the side on
detached latents (it never shapes them), turns latents back into pictures to watch:

    frame t --encoder--> tokens --action_conditioner(last 25 actions)--> predictor --> mean of t+1
    frame t+1 --target_encoder (EMA copy of the encoder)--> target tokens; loss = MSE per token
    mean + noise --sampler (flow matching, on the side)--> one possible set of tokens of t+1
    tokens + the last real frame --decoder (rectified flow, Euler steps from noise)--> frame

Notable choices (docs/faults.md: the original's faults they fix; docs/experiments.md: what each
measured change bought):
  - each of the 25 action tokens has its own temporal position (not an unordered bag)
  - the target is an EMA copy of the encoder in eval mode (momentum 0.996 -> 1.0), or with
    --target, the encoder's own latent kept from collapse by SIGReg or VICReg (LeWM)
  - latents are layer-normalised over features (no affine); the loss is per token
  - the predictor predicts a change to the start frame's target latent: untrained, it says
    "nothing changes", exactly the baseline every result is compared with
  - the loss covers an open-loop rollout and teacher-forced steps (V-JEPA 2-AC) and weighs each
    window by how much its view changes, so that big turns do not drown out the rest
  - an L2 loss learns the mean of the futures the model cannot tell apart; a small sampler
    draws one of them, and its first Euler step is that mean (planning and metrics use the mean)
  - the decoder, a DiT with adaLN-Zero, draws from the last real frame, whose pixels it keeps
    where nothing moved, each token into a window around its patch, blended: no seams
  - every evaluation reports pred/copy, action sensitivity, the collapse watch (std, rank),
    and the PSNR and sharpness of decoded predictions next to "nothing moves"

Shape legend: B batch, S frames in a window, R rollout steps, N tokens per frame, D width,
E decoder width, K action window (25), A action columns, H/W pixels, p patch size.

    python iwm.py --steps 1500                  # train (builds the built-in dataset if missing)
    python iwm.py --steps 3000 --resume         # continue the run in --out_dir up to step 3000
    python iwm.py --size base --bench 20        # time 20 steps on random data: FLOP/s, memory
    torchrun --nproc_per_node=4 iwm.py --steps 3000   # one process per GPU (DDP)

Reading order: config, helpers, attention, encoder, conditioner, rectified flow, predictor, sampler,
decoder, the world model (loss, regularisers, EMA), the loop; then data, evaluation, plumbing.
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import shutil
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import prepare_data
from prepare_data import ACTION_COLUMNS

# -----------------------------------------------------------------------------
# Config: one dataclass, every field a flag (--steps 3000 --size tiny)


@dataclass
class Config:
    # --- model (a --size preset sets these; flags override) ---
    size: str = "auto"               # tiny | small | base; auto: base on a CUDA GPU, tiny on CPU
    image_size: int = 64             # pixels (square); other frame sizes are resized on the device
    patch_size: int = 8              # pixels per patch side; N = (image_size / patch_size)^2 tokens
    width: int = 128                 # D, token width of the encoder, conditioner and predictor
    heads: int = 4                   # attention heads
    encoder_depth: int = 4           # transformer blocks in the encoder
    encoder_mlp_ratio: float = 4.0   # MLP hidden width / D
    conditioner_depth: int = 2       # cross-attention blocks: frame tokens attend to action tokens
    conditioner_mlp_ratio: float = 4.0
    predictor_depth: int = 4         # transformer blocks in the predictor
    predictor_mlp_ratio: float = 4.0
    sampler_depth: int = 2           # transformer blocks in the future sampler (MLP x4)
    decoder_width: int = 128         # E, the diffusion decoder's token width
    decoder_depth: int = 4           # DiT blocks in the decoder
    decoder_heads: int = 4
    decoder_mlp_ratio: float = 4.0
    # --- data ---
    data: str = "data/builtin"       # a dataset folder made by prepare_data.py (built if missing)
    frame_skip: int = 4              # raw frames per model step (VPT is 20 fps: 4 -> 0.2 s)
    action_window: int = 25          # K: per-frame actions the conditioner sees for one step
    context_gap: int = 16            # the decoder draws a frame 1..this model steps after a real
                                     # one it sees (a rollout's start frame, 16 steps back at most)
    # --- training ---
    steps: int = 3000                # optimizer steps in total (--resume continues up to this)
    batch_size: int = 32             # windows per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    rollout: int = 2                 # R: open-loop prediction steps in the loss (V-JEPA 2-AC: 2+)
    lr: float = 1e-3                 # peak learning rate (AdamW)
    decoder_lr_scale: float = 5.0    # decoder lr = lr * this: its latent-to-pixel map is badly
                                     # conditioned and learns far slower at the world model's lr
    min_lr_ratio: float = 0.1        # the cosine schedule ends at lr * this
    warmup_steps: int = 200          # linear warmup from 0 to lr
    weight_decay: float = 0.05       # on weight matrices only
    grad_clip: float = 1.0           # max global gradient norm
    ema_start: float = 0.996         # target encoder momentum at step 0 (I-JEPA)
    ema_end: float = 1.0             # ... rising linearly to this at the last step
    target: str = "ema"              # what keeps the latents apart: ema | sigreg | vicreg | none
    sigreg_weight: float = 0.09      # lambda of SIGReg (LeWM's code)
    vicreg_variance: float = 25.0    # weight of VICReg's variance hinge (VICReg's paper)
    vicreg_covariance: float = 25.0  # weight of VICReg's covariance penalty
    euler_steps: int = 10            # Euler steps per frame the decoder draws (tiny: 3, as good)
    seed: int = 0
    # --- hardware ---
    device: str = "auto"             # cpu | cuda | cuda:N | mps (Apple silicon; never auto) | auto
    dtype: str = "auto"              # float32 | bfloat16 | float16 (autocast) | auto
    grad_ckpt: bool = False          # activation checkpointing: recompute each block's activations
                                     # in the backward pass instead of storing them (less memory)
    compile: bool = False            # torch.compile each part (slow first steps, then faster)
    bench: int = 0                   # > 0: time this many training steps on random data and exit
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 500            # steps between validation lines
    eval_windows: int = 256          # validation windows (from validation episodes only)
    eval_horizon: int = 8            # pred/copy is reported for h = 1..this
    eval_psnr_windows: int = 32      # of those, windows the decoder draws at the end (0: none)
    ckpt_every: int = 500            # steps between checkpoints
    out_dir: str = "runs/iwm"        # checkpoint, log and resolved config go here
    resume: bool = False             # continue from <out_dir>/ckpt.pt


# Presets: model sizes, with the batch and learning rate that suit them.
PRESETS = {
    # learns the built-in world on a 2-core CPU in minutes (the quickstart)
    "tiny": dict(image_size=64, patch_size=8, width=128, heads=4, encoder_depth=4, euler_steps=3,
                 conditioner_depth=2, predictor_depth=4, batch_size=32, grad_accum=1, lr=1e-3),
    "small": dict(image_size=64, patch_size=8, width=256, heads=8, encoder_depth=6,
                  conditioner_depth=3, predictor_depth=6, decoder_width=256, decoder_depth=6,
                  decoder_heads=8, batch_size=32, grad_accum=1, lr=6e-4),
    # The original's sizes (a test checks each part within 5%; docs/faults.md): 224 px, patch 16,
    # width 768. Our conditioner blocks have MLPs, so 6 match its 16 plain cross-attention layers;
    # our decoder adds adaLN-Zero and 2p-wide output windows, so MLP x4.5 matches its x8.
    # Activation checkpointing keeps a micro-batch of 8 inside a 12 GB GPU (docs/memory.md).
    "base": dict(image_size=224, patch_size=16, width=768, heads=12, encoder_depth=16,
                 conditioner_depth=6, predictor_depth=12, predictor_mlp_ratio=13.0,
                 decoder_width=768, decoder_depth=12, decoder_heads=8, decoder_mlp_ratio=4.5,
                 batch_size=8, grad_accum=4, lr=3e-4, grad_ckpt=True),
}
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
    """uint8 RGB (..., H, W, 3) -> float (..., 3, size, size) in [-1, 1], on the device."""
    lead = frames.shape[:-3]
    x = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return x.reshape(*lead, 3, image_size, image_size)


def sincos_positions_2d(grid, dim):
    """Fixed 2-D sin-cos position embedding (MAE, I-JEPA): (grid*grid, dim). Half of the channels
    encode the row, half the column, each at dim/4 geometrically spaced frequencies."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.stack([rows.flatten()[:, None], cols.flatten()[:, None]], dim=1) * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)   # (N, 2, dim/2) -> (N, dim)


# -----------------------------------------------------------------------------
# Attention and transformer blocks


class Attention(nn.Module):
    """Multi-head attention. Self-attention when context is None, else x attends to context."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        B, N, D = x.shape
        h, source = self.heads, x if context is None else context
        q = self.query(x).view(B, N, h, D // h).transpose(1, 2)              # (B, h, N, D/h)
        kv = self.key_value(source).view(B, source.shape[1], 2, h, D // h)   # (B, M, 2, h, D/h)
        k, v = kv.permute(2, 0, 3, 1, 4)                                     # (B, h, M, D/h) each
        # attention: softmax(q k^T / sqrt(D/h)) v, spelled out on a CPU, where it is faster than
        # the fused kernel's backward for our short sequences (docs/experiments.md)
        if not x.is_cuda:
            weights = (q @ k.transpose(-2, -1) / math.sqrt(D // h)).softmax(-1)  # (B, h, N, M)
            x = weights @ v                                                  # (B, h, N, D/h)
        else:               # the same formula as one fused kernel: fast and memory-light on a GPU
            x = F.scaled_dot_product_attention(q, k, v)                      # (B, h, N, D/h)
        return self.out(x.transpose(1, 2).reshape(B, N, D))                  # (B, N, D)


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
    """ViT: patchify, add fixed 2-D positions, pre-norm blocks, a final layer norm without affine,
    so its output lives in the target's space (I-JEPA) and predictions can be fed back in during
    rollouts. Without an EMA target, a projector with BatchNorm follows (LeWM): a regulariser of
    the latents' distribution cannot move a layer-normalised output."""

    def __init__(self, cfg):
        super().__init__()
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("positions", sincos_positions_2d(grid, cfg.width), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.encoder_mlp_ratio)
                                    for _ in range(cfg.encoder_depth))
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False)
        D = cfg.width
        self.projector = nn.Identity() if cfg.target == "ema" else nn.Sequential(
            nn.Linear(D, 4 * D), nn.BatchNorm1d(4 * D), nn.GELU(), nn.Linear(4 * D, D))
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, images):                                  # (B, 3, H, W) in [-1, 1]
        x = self.patch_embed(images)                            # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.positions       # (B, N, D)
        x = run_blocks(self.blocks, x, checkpoint=self.grad_ckpt)
        x = self.norm(x)                                        # (B, N, D)
        return self.projector(x.flatten(0, 1)).view_as(x)       # (B, N, D) every token alike


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
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.conditioner_mlp_ratio, True)
                                    for _ in range(cfg.conditioner_depth))      # cross-attention
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, tokens, actions):                        # (B, N, D), (B, K, A) raw actions
        a = self.action_embed(scale_actions(actions)) + self.action_positions   # (B, K, D)
        return run_blocks(self.blocks, tokens, a, checkpoint=self.grad_ckpt)   # (B, N, D)


# -----------------------------------------------------------------------------
# Rectified flow (minRF, SD3), used twice: the sampler draws a possible next latent with it, the
# decoder a picture. t = 0 is the data, t = 1 pure noise, x_t = (1 - t) x_0 + t noise, velocity
# v = dx_t/dt = noise - x_0; sampling integrates v from t = 1 down to 0 in Euler steps. The
# network predicts the clean x_0 and v is derived from it (JiT, 2025): a velocity contains the
# noise, which a small network (or a token narrower than its patch, 128 < 8*8*3) cannot carry.
# The loss, the velocity error weighted by t^2, is exactly the clean error: every noise level
# counts the same (unweighted, the nearly clean end would weigh up to 400 times more).

MIN_T = 0.05   # floor of t when a velocity is derived from a predicted clean x_0 (JiT)
LATENT_EULER_STEPS = 4   # Euler steps per sampled latent (JEDI draws its latents in 3)


def per_example(t, x):
    """t (B,) shaped to broadcast over x (B, ...)."""
    return t.view(-1, *[1] * (x.dim() - 1))


def rectified_flow_loss(predict_clean, x0):
    """Per-example t^2-weighted velocity MSE (= clean MSE) -> (B,) of the model predict_clean(x_t,
    t). t ~ logit-normal (SD3): mid-range times, where the sample takes shape, are drawn most."""
    t = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))
    x_t = (1 - per_example(t, x0)) * x0 + per_example(t, x0) * torch.randn_like(x0)
    # t^2 * |v_hat - v|^2 with v_hat = (x_t - x0_hat) / t and v = (x_t - x0) / t:
    return (predict_clean(x_t, t).float() - x0.float()).pow(2).flatten(1).mean(dim=1)


@torch.no_grad()
def rectified_flow_sample(predict_clean, shape, euler_steps, generator=None, device="cpu"):
    """Start from noise at t = 1 and take euler_steps steps of size 1/euler_steps down to t = 0,
    each along v = (x_t - x_0) / t from the predicted clean x_0 (t floored at MIN_T)."""
    x = torch.randn(shape, generator=generator, device=device)
    for i in range(euler_steps):
        t = torch.full((shape[0],), 1 - i / euler_steps, device=device)
        velocity = (x - predict_clean(x, t).float()) / per_example(t.clamp_min(MIN_T), x)
        x = x - velocity / euler_steps
    return x


def timestep_embedding(t, dim):
    """Sin-cos features of diffusion time t in [0, 1] (scaled by 1000, as in DiT)."""
    frequencies = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = 1000 * t[:, None].float() * frequencies[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


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

    def forward(self, conditioned, base):                      # (B, N, D), (B, N, D)
        x = conditioned + self.positions                       # (B, N, D)
        x = run_blocks(self.blocks, x, checkpoint=self.grad_ckpt)
        return base + self.head(self.norm(x))                  # (B, N, D) base + predicted change


# -----------------------------------------------------------------------------
# Future sampler: one possible next latent, not only the average of those the predictor cannot
# tell apart (the minimiser of an L2 loss is that average; drawn, it is a blur)


class FutureSampler(nn.Module):
    """A flow-matching denoiser of the next latent's residual, (latent - mean) / its running RMS:
    given it noised to level t, t, the mean and the conditioned tokens, it predicts the clean
    residual as (1 - t) * a correction: 0 at t = 1 (pure noise), so its first Euler step goes to
    the mean, which the JEPA loss trains and planning and every latent metric use."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.register_buffer("positions", sincos_positions_2d(cfg.image_size // cfg.patch_size, D),
                             persistent=False)
        self.mean_in, self.noisy_in = nn.Linear(D, D), nn.Linear(D, D)
        self.time_in = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(Block(D, cfg.heads, 4.0) for _ in range(cfg.sampler_depth))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, D)
        self.grad_ckpt = cfg.grad_ckpt

    def forward(self, conditioned, mean, noisy, t):           # (B, N, D) x 3, t (B,)
        x = conditioned + self.positions + self.mean_in(mean) + self.noisy_in(noisy)
        x = x + self.time_in(timestep_embedding(t, 256))[:, None]                     # (B, N, D)
        x = run_blocks(self.blocks, x, checkpoint=self.grad_ckpt)
        return per_example(1 - t, mean) * self.head(self.norm(x))                      # (B, N, D)


# -----------------------------------------------------------------------------
# Diffusion decoder: latent tokens -> pixels, for watching and scoring predictions only.

MAX_LATENT_NOISE = 1.0   # the decoder learns with latent noise up to this std (latents: unit
NOISED_SHARE = 0.25      # variance; the predictor's RMS error < ~0.7) on this share of its batch
MEASURED_STEPS = 16      # rollout steps whose latent error is measured (later steps reuse the last)


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
    """Predicts the clean frame from a noisy one, given the frame's latent tokens, an earlier real
    frame (the context: in a rollout, its start frame) and how noisy the latent is.

    As in every frame-generating world model (DIAMOND, GameNGen), the decoder draws from the last
    real frame, and the latent says what changed; per pixel it also says how much of the context
    to keep, so still pixels pass through exactly (a token narrower than its patch, 128 < 8*8*3,
    could not carry them). Told the predictor's measured error, it trusts a far prediction less
    (it learns on target latents, some noised by an amount it is told: RAE). Patch i of the noisy
    frame, patch i of the context and latent token i make its token i; the latents' mean, t and
    the noise level condition every block."""

    def __init__(self, cfg):
        super().__init__()
        E, p = cfg.decoder_width, cfg.patch_size
        self.patch_size, self.grid = p, cfg.image_size // p
        self.patch_in = nn.Linear(3 * p * p, E)
        self.context_in = nn.Linear(3 * p * p, E)
        self.latent_in = nn.Linear(cfg.width, E)
        self.register_buffer("positions", sincos_positions_2d(self.grid, E), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(512, E), nn.SiLU(), nn.Linear(E, E))   # t, noise
        self.latent_pool = nn.Linear(cfg.width, E)
        self.blocks = nn.ModuleList(DecoderBlock(E, cfg.decoder_heads, cfg.decoder_mlp_ratio)
                                    for _ in range(cfg.decoder_depth))
        self.final_norm = nn.LayerNorm(E, elementwise_affine=False)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(E, 2 * E))
        # Token i draws a 2p x 2p window centred on patch i: per pixel, its colour and how much
        # context to keep. Overlapping windows are blended by a tent whose weights sum to 1, so
        # no patch border is a seam. The readout, a linear skip from token i to its window's
        # colours, draws the picture at once (the latents keep most of their patch linearly).
        self.patch_out = nn.Linear(E, 2 * 3 * 4 * p * p)
        self.readout = nn.Linear(cfg.width, 3 * 4 * p * p)
        self.grad_ckpt = cfg.grad_ckpt
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's inits in one place: Xavier-uniform linears, zero biases, zero adaLN modulations and
        output layer: it starts as the latent's readout, blended half and half with the context."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        modulations = [block.modulation[-1] for block in self.blocks] + [self.final_modulation[-1]]
        for layer in modulations + [self.patch_out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, images):                                # (B, 3, H, W) -> (B, N, 3*p*p)
        return F.unfold(images, self.patch_size, stride=self.patch_size).transpose(1, 2)

    def overlap_add(self, windows):                            # (B, N, 3*2p*2p) -> (B, 3, H, W)
        """Tent-weighted windows summed where they overlap, over the weights' sum there."""
        p, size = self.patch_size, self.grid * self.patch_size
        tent = 1 - (torch.arange(2 * p, device=windows.device) - p + 0.5).abs() / p      # (2p,)
        weights = torch.outer(tent, tent).repeat(3, 1, 1).flatten()[:, None]    # in F.fold's order
        fold = lambda x: F.fold(x, (size, size), 2 * p, stride=p, padding=p // 2)   # noqa: E731
        return fold(windows.transpose(1, 2) * weights) / fold(weights.expand(-1, windows.shape[1]))

    def forward(self, noisy, t, latent, context, latent_noise):
        """noisy (B, 3, H, W), t (B,), latent (B, N, D), context (B, 3, H, W), latent_noise (B,)."""
        x = self.patch_in(self.patchify(noisy)) + self.context_in(self.patchify(context))  # B,N,E
        x = x + self.latent_in(latent) + self.positions        # (B, N, E) patch i gets token i
        times = torch.cat([timestep_embedding(t, 256), timestep_embedding(latent_noise, 256)], 1)
        c = self.time_mlp(times) + self.latent_pool(latent.mean(dim=1))                     # (B, E)
        x = run_blocks(self.blocks, x, c, checkpoint=self.grad_ckpt)   # (B, N, E)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        colour, keep = self.patch_out(modulate(self.final_norm(x), shift, scale)).chunk(2, dim=-1)
        drawn = self.overlap_add(colour + self.readout(latent))               # (B, 3, H, W)
        keep = torch.sigmoid(self.overlap_add(keep))           # (B, 3, H, W) 1: the context's pixel
        return drawn + keep * (context - drawn)                # (B, 3, H, W) predicted clean image

    def draw(self, latent, context, latent_noise, euler_steps, generator=None):   # (B, 3, H, W)
        """A picture of the latent, drawn from noise in euler_steps Euler steps, in [-1, 1]."""
        draw = lambda x, t: self(x, t, latent, context, latent_noise)              # noqa: E731
        pixels = rectified_flow_sample(draw, context.shape, euler_steps, generator, latent.device)
        return pixels.clamp(-1, 1)


# -----------------------------------------------------------------------------
# The world model: the four parts, the JEPA loss and the EMA update


def jepa_loss(predicted, target):
    """Per-token squared error averaged over the feature axis -> (..., N). Reduced over features
    (D), never over tokens: every token is its own prediction (the original took a norm over the
    patch axis). MSE rather than smooth-L1 because pred/copy, the number we judge the model by,
    is a ratio of mean squared errors. The targets are layer-normalised, so errors are O(1)."""
    return (predicted.float() - target.float()).pow(2).mean(dim=-1)


# What keeps the latents apart. With an EMA target (I-JEPA, V-JEPA): the stop-gradient and the
# slowly moving target. Without one, the target is the encoder's own latent of the later frame,
# with its gradient, and a regulariser of the latents' spread over the batch: SIGReg (LeJEPA,
# LeWM) or VICReg. With neither (--target none), every frame may get one latent that predicts
# itself perfectly: collapse.


def target_regularizer(latents, cfg):                         # (B, S, N, D) the targets
    """The regulariser of the target latents (0 for ema and none) on a few random tokens of each
    frame (all of them cost SIGReg 20x the step; one mean token per frame, as LeWM, lost the
    picture: docs/recipes.md), in float32 (SIGReg turns NaN late in bf16), on the global batch."""
    if cfg.target in ("ema", "none"):
        return 0.0
    tokens = latents[:, :, torch.randperm(latents.shape[2])[:TOKENS_PER_FRAME]]      # (B, S, 8, D)
    with torch.autocast(latents.device.type, enabled=False):
        samples = gathered(tokens.flatten(0, 2).float())                              # (M, D)
        if cfg.target == "sigreg":
            return cfg.sigreg_weight * sigreg(samples)
        variance, covariance = vicreg_terms(samples)
        return cfg.vicreg_variance * variance + cfg.vicreg_covariance * covariance


TOKENS_PER_FRAME = 8       # tokens of each frame that the regulariser sees
SIGREG_DIRECTIONS = 1024   # random unit directions, drawn afresh each step (LeJEPA)
SIGREG_POINTS = 17         # points s on [0, 3] where characteristic functions are compared


def sigreg(samples):                                           # (M, D)
    """SIGReg (LeJEPA): how far samples are from a standard Gaussian along random directions. On
    each, the Epps-Pulley statistic M * integral of |mean_m exp(i s x_m) - exp(-s^2 / 2)|^2
    exp(-s^2 / 2) ds (the projections' characteristic function against the Gaussian's), by the
    trapezoid rule on [0, 3], doubled for s < 0. Mean over directions: about 1 for Gaussian
    samples whatever M, at least about 0.4 M for a constant batch."""
    directions = torch.randn(samples.shape[1], SIGREG_DIRECTIONS, device=samples.device)   # (D, P)
    if dist.is_initialized():
        dist.broadcast(directions, src=0)                     # every process uses the same ones
    directions = directions / (directions.norm(dim=0) + 1e-8)
    s = torch.linspace(0, 3, SIGREG_POINTS, device=samples.device)                   # (Q,)
    gaussian = torch.exp(-s ** 2 / 2)
    weights = 2 * (3 / (SIGREG_POINTS - 1)) * gaussian                                # (Q,)
    weights[[0, -1]] /= 2                                                 # the trapezoid's ends
    angles = (samples @ directions)[..., None] * s                                    # (M, P, Q)
    real, imaginary = angles.cos().mean(0) - gaussian, angles.sin().mean(0)           # (P, Q)
    return (len(samples) * (real ** 2 + imaginary ** 2) @ weights).mean()


def vicreg_terms(samples):                                     # (M, D)
    """VICReg's variance term, mean(relu(1 - std)) over features (each feature's std over the
    batch at least 1), and covariance term, the off-diagonal squares of the covariance / D."""
    x = samples - samples.mean(dim=0)
    variance = F.relu(1 - (x.var(dim=0) + 1e-4).sqrt()).mean()
    covariance = x.T @ x / (len(x) - 1)                                               # (D, D)
    return variance, (covariance.pow(2).sum() - covariance.diagonal().pow(2).sum()) / x.shape[1]


class WorldModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.action_conditioner = ActionConditioner(cfg)
        self.predictor = Predictor(cfg)
        self.sampler = FutureSampler(cfg)                      # reads detached inputs only
        ema = cfg.target == "ema"              # then the target is an EMA copy of the encoder
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False) if ema else None
        self.decoder = Decoder(cfg)                            # reads detached latents only
        # The predictor's RMS latent error at rollout steps 1..16, measured on training windows at
        # each evaluation and saved with the weights: how far the decoder may trust a prediction
        self.register_buffer("latent_error", torch.zeros(MEASURED_STEPS))
        self.register_buffer("residual_rms", torch.ones(()))   # the sampler's scale: a running RMS

    def train(self, mode=True):
        super().train(mode)
        if self.target_encoder is not None:
            self.target_encoder.eval()   # important! the target is always in eval mode
        return self

    def encode(self, frames, encoder=None):                    # (B, S, H, W, 3) uint8
        """Latents of each frame, (B, S, N, D): the encoder's, or another encoder's."""
        B, S = frames.shape[:2]
        x = normalize_frames(frames, self.cfg.image_size).flatten(0, 1)        # (B*S, 3, H, W)
        return (encoder or self.encoder)(x).unflatten(0, (B, S))               # (B, S, N, D)

    def encode_target(self, frames):
        """The JEPA target of each frame, (B, S, N, D): the target encoder's latents, never with a
        gradient, or without a target encoder, the encoder's own, with their gradient."""
        if self.target_encoder is None:
            return self.encode(frames)
        with torch.no_grad():
            return self.encode(frames, self.target_encoder)

    def predict_next(self, latent, actions, base=None, euler_steps=0, generator=None):
        """One model step, (B, N, D), (B, K, A) -> (B, N, D): the latent frame_skip frames later,
        base + a predicted change (base: the latent itself unless given, the start's target). The
        mean of the possible next latents, or with euler_steps > 0, one drawn in that many steps."""
        conditioned = self.action_conditioner(latent, actions)
        mean = self.predictor(conditioned, latent if base is None else base)
        if not euler_steps:
            return mean
        denoise = lambda x, t: self.sampler(conditioned, mean, x, t)       # noqa: E731
        drawn = rectified_flow_sample(denoise, latent.shape, euler_steps, generator, latent.device)
        return mean + self.residual_rms * drawn                 # the residual back at its scale

    def rollout(self, latent, actions, base=None, euler_steps=0, generator=None):
        """Open loop from the encoded start frame, each prediction fed back in, (B, R, N, D): the
        means, or one possible future. Step 1's "nothing changes" is the start's target, `base`."""
        predictions = []
        for step in range(actions.shape[1]):
            latent = self.predict_next(latent, actions[:, step], base if step == 0 else None,
                                       euler_steps, generator)
            predictions.append(latent)
        return torch.stack(predictions, dim=1)

    def forward(self, frames, actions, context):   # (B, R+1, H, W, 3), (B, R, K, A), (B, H, W, 3)
        """Training loss = JEPA loss + decoder loss. Also returns the parts, for logging. context:
        a real frame 1..context_gap steps before frames[:, 1], the frame the decoder draws."""
        assert frames.shape[1] == actions.shape[1] + 1, "need one more frame than action windows"
        B, R = actions.shape[:2]
        # Step 1: targets, the start frame's too: from the EMA encoder (no gradient, eval mode)
        targets = self.encode_target(frames)                                  # (B, R+1, N, D)
        # Step 2: predictions. Open loop from the encoded start frame, and one teacher-forced step
        # from each later true target latent (V-JEPA 2-AC trains both ways).
        start = self.encode(frames[:, :1])[:, 0]                              # (B, N, D)
        predictions = self.rollout(start, actions, targets[:, 0])               # (B, R, N, D)
        forced = self.predict_next(targets[:, 1:-1].flatten(0, 1), actions[:, 1:].flatten(0, 1))
        errors = torch.cat([jepa_loss(predictions, targets[:, 1:]),             # (B, R, N)
                            jepa_loss(forced.unflatten(0, (B, R - 1)), targets[:, 2:])],  # B,R-1,N
                           dim=1).mean(dim=(1, 2))                              # (B,)
        change = jepa_loss(targets[:, :1], targets[:, 1:]).mean(dim=(1, 2))   # (B,) nothing changes
        world_loss = (errors * window_weights(change)).mean()
        world_loss = world_loss + target_regularizer(targets, self.cfg)     # 0 for the EMA target
        # Step 2b: the sampler learns the next latent as a residual around step 1's mean, at unit
        # scale (over its running RMS, which training batches update), by flow matching on all
        # tokens at once, from detached inputs: it shapes neither the latents nor the mean
        conditioned = self.action_conditioner(start, actions[:, 0]).detach()
        mean = predictions[:, 0].detach()
        denoise = lambda x, t: self.sampler(conditioned, mean, x, t)                 # noqa: E731
        residual = targets[:, 1].detach() - mean                                     # (B, N, D)
        self.residual_rms.lerp_(residual.float().pow(2).mean().sqrt(), 0.01 * self.training)
        flow_loss = rectified_flow_loss(denoise, residual / self.residual_rms).mean()
        # Step 2c: the decoder learns to draw frame 1 from the context frame and its target latent:
        # exact (a sharp picture) or, for NOISED_SHARE of the batch, noised by an amount it is told.
        # Detached: no decoder gradient reaches the JEPA (DINO-WM and LeWM plan worse when it does)
        u = torch.rand(B, device=frames.device)           # where u < share, u / share ~ U(0, 1)
        noise = MAX_LATENT_NOISE * (u < NOISED_SHARE) * u / NOISED_SHARE              # (B,)
        latent = targets[:, 1].detach()                                          # (B, N, D)
        latent = latent + noise[:, None, None] * torch.randn_like(latent)
        image, context = (normalize_frames(x, self.cfg.image_size) for x in (frames[:, 1], context))
        draw = lambda x, t: self.decoder(x, t, latent, context, noise)       # noqa: E731
        decoder_loss = rectified_flow_loss(draw, image).mean()
        parts = {"world_loss": world_loss.detach(), "flow_loss": flow_loss.detach(),
                 "decoder_loss": decoder_loss.detach()}
        return world_loss + flow_loss + decoder_loss, parts

    @torch.no_grad()
    def update_target(self, momentum):
        """Step 3: target <- momentum * target + (1 - momentum) * encoder (--target ema)."""
        targets = [] if self.target_encoder is None else self.target_encoder.parameters()
        for target, online in zip(targets, self.encoder.parameters()):
            target.lerp_(online, 1.0 - momentum)


def window_weights(change):
    """Each window's weight in the loss, from how much its view changes (B,): its error counts
    relative to that change plus the batch's mean change, so that big turns do not drown out
    walking and standing still. Mean 1; a batch that never moves gets equal weights."""
    change = change.detach()                  # a weight, never a way to lower the loss
    weight = 1 / (change + change.mean() + 1e-6)
    return weight / weight.mean()


def ema_momentum(step, cfg):
    """Linear ramp ema_start -> ema_end over training (I-JEPA): the target changes ever slower."""
    return cfg.ema_start + (cfg.ema_end - cfg.ema_start) * min(step / max(cfg.steps, 1), 1.0)


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))                       # 1 -> 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# -----------------------------------------------------------------------------
# Training: the loop (its data, helpers and plumbing come after it)


def fit(cfg):
    """Train (or resume) a world model as cfg says. Returns (model, the last evaluation's metrics).
    The plumbing (processes, hardware, data, the log, evaluations, checkpoints, stopping) is in
    Run, after the evaluation."""
    run = Run(cfg)
    model = WorldModel(cfg).to(run.device)      # the same seed in every process: the same weights
    optimizer, scaler = make_optimizer(model, cfg, run.device.type, run.dtype)
    trained, step = run.start(model, optimizer, scaler)     # resumed, compiled, wrapped, as asked
    model.train()
    with run.steps(step):                       # the progress bar; a stop request ends the step
        while step < cfg.steps and not run.stopping:
            run.begin_step(step)    # seeds its draws: resumed runs draw what unbroken ones would
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            # Steps 1 and 2 (in WorldModel.forward): targets, predictions, the loss; backward, clip
            losses = accumulate_gradients(trained, run, optimizer, scaler)
            numbers = run.share(step, **losses)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            # Step 3: the target encoder follows the encoder
            model.update_target(ema_momentum(step, cfg))
            step += 1
            run.end_step(step, model, optimizer, scaler, lr=lr, **numbers)   # log, evaluate, save
    return run.finish(model, step)


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
    """Uniformly random windows of horizon + 1 frames, frame_skip apart, and for each model step
    the action window of that transition (docs/data.md, "Time")."""

    def __init__(self, episodes, horizon, cfg, flag="--rollout"):
        span = horizon * cfg.frame_skip
        self.episodes = [e for e in episodes if len(e["frames"]) > span]
        if not self.episodes:
            raise ValueError(f"no episode is longer than {span} frames ({flag} {horizon} model "
                             f"steps of {cfg.frame_skip}): lower {flag} or use longer episodes")
        self.horizon, self.frame_skip = horizon, cfg.frame_skip
        self.window, self.context_gap = cfg.action_window, cfg.context_gap
        starts_per_episode = torch.tensor([len(e["frames"]) - span for e in self.episodes])
        self.first_start = torch.cumsum(starts_per_episode, 0) - starts_per_episode
        self.total = int(starts_per_episode.sum())

    def window_at(self, episode, start):
        """Frames (S, H, W, 3) uint8 and action windows (S - 1, K, A) of one window."""
        steps = start + self.frame_skip * np.arange(self.horizon + 1)         # the frames' indices
        frames = np.asarray(episode["frames"][steps])
        actions = [action_window(episode["actions"], end, self.window) for end in steps[1:]]
        return frames, np.stack(actions)

    def sample_positions(self, batch_size, generator=None):
        """(episode, start frame) of batch_size uniformly random windows."""
        flat = torch.randint(self.total, (batch_size,), generator=generator)
        which = torch.searchsorted(self.first_start, flat, right=True) - 1
        return [(self.episodes[e], int(f - self.first_start[e]))
                for e, f in zip(which.tolist(), flat)]

    def sample(self, batch_size, generator=None):
        """Windows, and the decoder's context frame for each: 1..context_gap model steps before its
        frame 1 (at the episode's first frame at the earliest)."""
        positions = self.sample_positions(batch_size, generator)
        windows = [self.window_at(episode, start) for episode, start in positions]
        gaps = torch.randint(1, self.context_gap + 1, (batch_size,), generator=generator).tolist()
        frames = torch.from_numpy(np.stack([w[0] for w in windows]))     # (B, S, H, W, 3)
        actions = torch.from_numpy(np.stack([w[1] for w in windows]))    # (B, S-1, K, A)
        context = np.stack([episode["frames"][max(start + (1 - gap) * self.frame_skip, 0)]
                            for (episode, start), gap in zip(positions, gaps)])    # (B, H, W, 3)
        return frames, actions, torch.from_numpy(context)


# -----------------------------------------------------------------------------
# Evaluation: the numbers every file reports the same way (docs/metrics.md)

ERROR_WINDOWS = 32         # training windows on which the predictor's latent error is measured


def mean_squared_error(images, reference):
    """Per image, for images (..., 3, H, W) -> (...)."""
    return (images.float() - reference.float()).pow(2).mean(dim=(-3, -2, -1))


def psnr(mse):
    """PSNR in dB of a mean squared error, for images in [-1, 1] (peak-to-peak 2): 10 log10(2^2 / MSE).
    A summary over many images is the PSNR of their mean squared error: a mean of per-image PSNRs
    lets one unchanged window (an unbounded PSNR) outweigh all the others."""
    return 10 * torch.log10(4.0 / torch.as_tensor(mse).clamp_min(1e-10))


def effective_rank(gram):
    """RankMe (Garrido et al. 2023) of a matrix of latents X (samples x features), from its Gram
    matrix X^T X or X X^T: exp of the entropy of X's singular values normalised to sum 1. The
    number of directions the latents use alike; 1 when they all lie on one line (collapse)."""
    singular = torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt()
    return torch.exp(torch.special.entr(singular / singular.sum()).sum()).item()


def ratio(numerator, denominator):
    """numerator / denominator elementwise as a list, None where the denominator is 0 (a figure
    that cannot be computed, say the error of "nothing changes" on a clip where nothing does)."""
    return [n / d if d > 0 else None for n, d in zip(torch.as_tensor(numerator).reshape(-1).tolist(),
                                                     torch.as_tensor(denominator).reshape(-1).tolist())]


def grey(images):
    """(..., 3, H, W) -> (..., H, W), luma weights (ITU-R BT.601)."""
    return torch.einsum("...chw,c->...hw", images.float(), torch.tensor([0.299, 0.587, 0.114], device=images.device))


def sharpness(images):
    """Variance of the Laplacian of the grey image, per image (a standard focus measure): blur
    lowers it, hard patch edges raise it. images (..., 3, H, W) -> (...)."""
    g = grey(images)
    laplacian = g[..., :-2, 1:-1] + g[..., 2:, 1:-1] + g[..., 1:-1, :-2] + g[..., 1:-1, 2:] - 4 * g[..., 1:-1, 1:-1]
    return laplacian.flatten(-2).var(dim=-1)


def patch_grid(images, patch):
    """How visible the grid of patch x patch tiles is, per image: the mean colour step across tile
    borders over the mean step across every other pixel border. About 1 for a real frame; well
    above 1 for a mosaic whose tiles are coloured each on its own. images (..., 3, S, S) -> (...)."""
    across = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=(-3, -2))   # (..., S-1)
    down = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=(-3, -1))     # (..., S-1)
    steps = across + down                                         # (..., S-1): pixel j -> j + 1
    border = steps[..., patch - 1::patch]                         # the steps into a new tile
    others = (steps.sum(-1) - border.sum(-1)) / (steps.shape[-1] - border.shape[-1])
    return border.mean(-1) / others.clamp_min(1e-8)


def ssim(images, reference):
    """Structural similarity (Wang et al. 2004) of the grey images, per image: local means,
    variances and covariance under an 11x11 Gaussian window (sigma 1.5), averaged over the
    positions where the window fits. 1 is identical; blur and wrong edges lower it."""
    # on [0, 1] (its luminance term assumes non-negative pixels), the usual constants for that range
    x, y = ((grey(z).flatten(0, -3)[:, None] + 1) / 2 for z in (images, reference))         # (n, 1, H, W)
    g = torch.exp(-(torch.arange(11, device=x.device) - 5.0) ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None] / g.sum() ** 2)[None, None]                              # (1, 1, 11, 11)
    mean_x, mean_y, xx, yy, xy = (F.conv2d(z, window) for z in (x, y, x * x, y * y, x * y))
    var_x, var_y, cov = xx - mean_x ** 2, yy - mean_y ** 2, xy - mean_x * mean_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = (2 * mean_x * mean_y + c1) * (2 * cov + c2) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=(1, 2, 3)).reshape(images.shape[:-3])


@torch.no_grad()
def measure_latent_error(model, frames, actions, device, autocast):
    """The predictor's RMS latent error at each open-loop step 1..16 on training windows, stored
    in model.latent_error: at sampling time the decoder is told it as the latent's noise level."""
    with autocast:
        targets = model.encode_target(frames.to(device)).float()                            # (b, 17, N, D)
        predicted = model.rollout(model.encode(frames[:, :1].to(device))[:, 0], actions.to(device), targets[:, 0])
    error = jepa_loss(predicted, targets[:, 1:]).mean(dim=(0, 2)).sqrt()                   # (steps,)
    model.latent_error.copy_(torch.cat([error, error[-1:].expand(len(model.latent_error) - len(error))]))


@torch.no_grad()
def draw_rollout(model, latents, start, predicted, euler_steps, generator=None, chunk=256):
    """Pictures of a rollout's latents (B, S, N, D) from its start frames (B, H, W, 3) uint8, which
    the decoder sees as context: told the predictor's measured error at each step for predicted
    latents, the mean or a sampled future (predicted=True), 0 for true target latents. Drawn
    chunk images at a time, to bound memory. Returns (B, S, 3, H, W) in [-1, 1]."""
    B, S = latents.shape[:2]
    context = normalize_frames(start, model.cfg.image_size)[:, None].expand(-1, S, -1, -1, -1).flatten(0, 1)
    steps = torch.arange(S, device=latents.device).clamp_max(len(model.latent_error) - 1)
    noise = (model.latent_error[steps] if predicted else torch.zeros(S, device=latents.device)).repeat(B)
    latents = latents.flatten(0, 1)
    images = [model.decoder.draw(latents[i:i + chunk], context[i:i + chunk], noise[i:i + chunk], euler_steps, generator)
              for i in range(0, B * S, chunk)]
    return torch.cat(images).unflatten(0, (B, S))


STILL_MSE = 1e-5          # a true frame this close to the start frame (50 dB) counts as unchanged
FUTURES_DRAWN = 4         # of the sampled futures, how many the decoder draws (best of 4)


@torch.no_grad()
def evaluate(model, frames, actions, device, autocast, psnr_windows=0, euler_steps=10, chunk=16, futures=0):
    """On fixed validation windows: val loss, pred/copy for h = 1..H, action sensitivity (error
    with actions shuffled across windows / with the true ones), target std (of each latent
    feature across the windows) and the effective rank of the start frames' target latents (one
    row of N*D numbers per frame: a collapsed encoder gives every frame the same row, rank 1).

    The decoder also draws the first psnr_windows windows' futures from the predicted mean and from
    the target latents (reconstruction), and from the mean under shuffled actions: PSNR (of the
    mean squared error over windows) and SSIM against the true frames per horizon, next to those
    of repeating the start frame; the sharpness of the drawn predictions relative to the true
    frames'; how visible the patch grid is (patch_grid: the truth's, the mean's, the
    reconstruction's, a sample's); controllability, the PSNR with the true actions minus that
    with shuffled ones (Genie's delta-t PSNR); and the PSNR where the true view has not changed
    since the start.
    With futures > 0, as many possible futures are sampled per window: how close the average of
    K of them comes to the mean (latent MSE / the mean's error; about 1/K if they spread as the
    truth does), and the first FUTURES_DRAWN are drawn: PSNR of one, of the best per frame, their
    sharpness and controllability. A figure that cannot be computed (a ratio over 0) is None."""
    was_training = model.training
    model.eval()
    errors, sums = torch.zeros(3, actions.shape[1]), {}                     # predicted, copy, shuffled
    starts = []                                          # start frames' target latents: std, rank
    generator = torch.Generator(device).manual_seed(0)                      # the same noise every eval
    for i in range(0, len(frames), chunk):
        f, a = frames[i:i + chunk].to(device), actions[i:i + chunk].to(device)
        with autocast:
            targets = model.encode_target(f).float()                        # (b, H+1, N, D)
            latent = model.encode(f[:, :1])[:, 0]                           # (b, N, D)
            predicted = model.rollout(latent, a, targets[:, 0]).float()     # (b, H, N, D)
            shuffled = model.rollout(latent, a.roll(1, dims=0), targets[:, 0]).float()   # another window's actions
            sampled = [model.rollout(latent, a, targets[:, 0], LATENT_EULER_STEPS, generator).float()
                       for _ in range(futures)]                             # futures x (b, H, N, D)
        for row, guess in enumerate([predicted, targets[:, :1], shuffled]):  # targets[:, :1]: "nothing changes"
            errors[row] += jepa_loss(guess, targets[:, 1:]).mean(-1).sum(0).cpu()
        for k in [k for k in (1, 4, 16) if k <= futures]:
            average = torch.stack(sampled[:k]).mean(0)
            add(sums, f"gap_{k}", jepa_loss(average, predicted).sum(), jepa_loss(predicted, targets[:, 1:]).sum())
        starts.append(targets[:, 0].flatten(1).cpu())                        # (b, N*D) one row per frame
        if i < psnr_windows:
            b = min(psnr_windows - i, len(f))
            draw = lambda latents, is_prediction: draw_rollout(model, latents[:b], f[:b, 0], is_prediction,   # noqa: E731
                                                               euler_steps, generator)
            with autocast:                                   # this order: the same noise each eval
                drawn, rebuilt, other = draw(predicted, True), draw(targets[:, 1:], False), draw(shuffled, True)
            truth = normalize_frames(f[:b, 1:], model.cfg.image_size)
            start = normalize_frames(f[:b, :1], model.cfg.image_size).expand_as(truth)
            still = (mean_squared_error(start, truth) < STILL_MSE).cumprod(dim=1).float()   # (b, H) unchanged so far
            mse = mean_squared_error(drawn, truth)
            add(sums, "mse_prediction", mse.sum(0), len(mse))
            add(sums, "mse_reconstruction", mean_squared_error(rebuilt, truth).sum(0), len(mse))
            add(sums, "mse_repeat_start", mean_squared_error(start, truth).sum(0), len(mse))
            add(sums, "mse_shuffled", mean_squared_error(other, truth).sum(0), len(mse))
            add(sums, "mse_still", (mse * still).sum(0), still.sum(0))
            for name, images in (("prediction", drawn), ("reconstruction", rebuilt), ("repeat_start", start)):
                add(sums, f"ssim_{name}", ssim(images, truth).sum(0), len(mse))
            sharp_drawn, sharp_truth = sharpness(drawn), sharpness(truth)                  # (b, H) each
            add(sums, "sharpness", sharp_drawn.sum(0), sharp_truth.sum(0))
            add(sums, "sharpness_still", (sharp_drawn * still).sum(0), (sharp_truth * still).sum(0))
            for name, images in (("prediction", drawn), ("reconstruction", rebuilt), ("truth", truth)):
                add(sums, f"grid_{name}", patch_grid(images, model.cfg.patch_size).sum(0), len(mse))
            if futures:
                with autocast:
                    pictures = [draw(latents, True) for latents in sampled[:FUTURES_DRAWN]]
                    other = draw(model.rollout(latent, a.roll(1, dims=0), targets[:, 0], LATENT_EULER_STEPS,
                                               generator).float(), True)
                sample_mse = torch.stack([mean_squared_error(p, truth) for p in pictures])   # (K, b, H)
                add(sums, "mse_sample", sample_mse[0].sum(0), len(mse))
                add(sums, "mse_best_sample", sample_mse.min(dim=0).values.sum(0), len(mse))
                add(sums, "mse_sample_shuffled", mean_squared_error(other, truth).sum(0), len(mse))
                add(sums, "sharpness_sample", sharpness(pictures[0]).sum(0), sharp_truth.sum(0))
                add(sums, "grid_sample", patch_grid(pictures[0], model.cfg.patch_size).sum(0), len(mse))
    n, starts = len(frames), torch.cat(starts).double()                     # (n, N*D)
    metrics = {"val_loss": (errors[0, :model.cfg.rollout].sum() / n / model.cfg.rollout).item(),
               "pred_copy": ratio(errors[0], errors[1]), "action_sensitivity": ratio(errors[2].sum(), errors[0].sum())[0],
               "target_std": starts.std(dim=0).mean().item() if n > 1 else None,   # per (token, feature)
               "effective_rank": effective_rank(starts @ starts.T)}
    means = {key: ratio(*value) for key, value in sums.items()}             # each a list per horizon
    for key in [k for k in means if k.startswith("mse_")]:
        metrics["psnr_" + key[4:]] = [None if m is None else psnr(m).item() for m in means[key]]
    metrics.update({k: v for k, v in means.items() if k.startswith(("ssim_", "sharpness", "grid_"))})
    metrics.update({k: v[0] for k, v in means.items() if k.startswith("gap_")})
    if "mse_prediction" in sums:                                            # frames were drawn
        metrics["still_windows"] = sums["mse_still"][1].tolist()
        metrics["controllability"] = [p - q for p, q in zip(metrics["psnr_prediction"], metrics["psnr_shuffled"])]
    if "mse_sample" in sums:
        metrics["controllability_sample"] = [p - q for p, q in zip(metrics["psnr_sample"], metrics["psnr_sample_shuffled"])]
    model.train(was_training)
    return metrics


def add(sums, key, numerator, denominator):
    """Accumulate a ratio's numerator and denominator (tensors or numbers) under key."""
    numerator, denominator = torch.broadcast_tensors(torch.as_tensor(numerator).double().cpu(),
                                                     torch.as_tensor(denominator).double().cpu())
    old = sums.get(key, (0, 0))
    sums[key] = (old[0] + numerator, old[1] + denominator)


def show(value, digits):
    """A figure for a table: n/a where it could not be computed (None, NaN or infinite)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def format_eval(step, metrics):
    def row(key, digits):
        return " ".join(show(v, digits) for v in metrics[key])

    text = (f"step {step}: val loss {metrics['val_loss']:.4f} | pred/copy h=1..{len(metrics['pred_copy'])}: "
            f"{row('pred_copy', 2)} | action sensitivity {show(metrics['action_sensitivity'], 2)} | "
            f"target std {show(metrics['target_std'], 3)} | effective rank {metrics['effective_rank']:.1f}")
    if "psnr_prediction" in metrics:
        text += (f"\n  PSNR dB h=1..: prediction {row('psnr_prediction', 1)} | repeat start {row('psnr_repeat_start', 1)}"
                 f" | reconstruction {row('psnr_reconstruction', 1)}"
                 f"\n  SSIM h=1..: prediction {row('ssim_prediction', 2)} | repeat start {row('ssim_repeat_start', 2)}"
                 f" | reconstruction {row('ssim_reconstruction', 2)}"
                 f"\n  sharpness (1 = as sharp as the truth) h=1..: {row('sharpness', 2)} | controllability dB "
                 f"h=1..: {row('controllability', 1)}"
                 f"\n  where the view has not changed: PSNR dB h=1..: {row('psnr_still', 1)} (windows "
                 f"{row('still_windows', 0)})")
    return text


# -----------------------------------------------------------------------------
# Checkpoints: one self-describing file, written atomically, loadable with weights_only=True


class CheckpointError(Exception):
    pass


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash or a full disk never touches the last good
    checkpoint, and a failed write leaves nothing behind."""
    try:
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        raise CheckpointError(f"{path} could not be written ({str(e).strip().splitlines()[0]}); its disk has "
                              f"{free:.0f} MB free. Free some space and continue with --resume: the last checkpoint "
                              "is intact") from None


def load_checkpoint(path):
    """The checkpoint's dict, or an error that says what is wrong with the file."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint: give the checkpoint in it, "
                              f"{os.path.join(path, 'ckpt.pt')}")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no checkpoint there (train one first with `python iwm.py`, "
                              "or give the path of the run's ckpt.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # torch's unpickling message suggests weights_only=False, which we never advise
        detail = ("not a file of plain tensors and numbers" if isinstance(e, pickle.UnpicklingError)
                  else "an empty file" if os.path.getsize(path) == 0
                  else (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0])
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({detail}); it is truncated or not a "
                              "checkpoint of this project: restore a good copy, or delete it and train again") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise CheckpointError(f"{path} is not an iwm.py checkpoint (no model, config or step in it)")
    missing = [k for k in ["size"] + MODEL_FIELDS if k not in state["config"]]
    if missing:
        raise CheckpointError(f"{path}: its config lacks {', '.join(missing)}; was it written by another version of iwm.py?")
    return state


def saved_config(state, **overrides):
    """The Config a checkpoint was trained with, flags on top (fields this version lacks are dropped)."""
    known = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in {**state["config"], **overrides}.items() if k in known})


def load_model_state(model, state, path):
    """Load weights, or say which parameter is missing, unexpected or of another shape."""
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        first_problem = (str(e).splitlines()[1:] or [str(e)])[0].strip()
        raise CheckpointError(f"{path} does not fit this model ({first_problem}); was it written by another "
                              "version of iwm.py?") from None


def resume(path, model, optimizer, scaler, say):
    """Load the weights, EMA target and optimizer state of a run. Returns its step."""
    state = load_checkpoint(path)
    if not {"optimizer", "scaler"} <= state.keys():
        raise CheckpointError(f"{path} holds weights only (no optimizer state): sample.py reads it, but training "
                              "cannot continue from it; start a new run with another --out_dir")
    load_model_state(model, state, path)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    say(f"resumed from {path} at step {state['step']}")
    return state["step"]


# -----------------------------------------------------------------------------
# The plumbing of a training run, so that fit reads as the recipe


class Run:
    """One training run's processes (torchrun), hardware and precision, data, run folder and log,
    progress bar, stop requests, evaluations and checkpoints. Only rank 0 talks and writes."""

    def __init__(self, cfg):
        check_config(cfg)
        self.cfg = cfg
        self.rank, local_rank, self.world_size = start_processes()
        self.say = print if self.rank == 0 else (lambda *args, **kwargs: None)
        self.device, self.dtype = choose_hardware(cfg, local_rank, self.say)
        self.autocast = autocast_to(self.device.type, self.dtype)
        torch.manual_seed(cfg.seed)
        self.sampler, self.val_frames, self.val_actions, self.error_windows, self.ckpt_path = prepare_run(cfg, self.say)
        self.metrics, self.speeds, self.stopping, self.log, self.started = {}, [], False, None, 0.0

    def start(self, model, optimizer, scaler):
        """Resume (--resume), compile (--compile), wrap for torchrun, open the log. Returns (the
        module to train, the first step)."""
        self.say("parameters: " + ", ".join(f"{part} {n / 1e6:.2f}M" for part, n in count_parameters(model).items()))
        step = resume(self.ckpt_path, model, optimizer, scaler, self.say) if self.cfg.resume else 0
        if self.cfg.compile:
            compile_parts(model)
        self.log = open_log(self.cfg, step) if self.rank == 0 else None
        return (nn.parallel.DistributedDataParallel(model) if self.world_size > 1 else model), step

    @contextlib.contextmanager
    def steps(self, step):
        """The progress bar, and Ctrl-C, SIGTERM or SIGHUP as requests to stop after the step."""
        with stop_requests() as self.requests, tqdm(total=self.cfg.steps, initial=step, desc="train", unit="step",
                                                    dynamic_ncols=True, disable=self.rank > 0) as self.bar:
            yield

    def begin_step(self, step):
        """Each step's random draws (its windows, its diffusion noise) come from a seed made of the
        run's seed, the process and the step: a resumed run draws what an unbroken one would."""
        self.started = time.perf_counter()
        torch.manual_seed((self.cfg.seed * 1000 + self.rank) * 10_000_000 + step)

    def share(self, step, **numbers):
        """The step's one wait for the device: the numbers to log and any stop request, averaged
        over the processes so that all log the same loss and stop after the same step. A loss
        that is not finite stops the run."""
        *values, stops = mean_over_processes([*numbers.values(), len(self.requests)], self.device, self.world_size)
        self.stopping = stops > 0
        numbers = dict(zip(numbers, values))
        if not math.isfinite(numbers["loss"]):
            raise FloatingPointError(non_finite_loss(numbers["loss"], step, self.ckpt_path, self.dtype))
        return numbers

    def end_step(self, step, model, optimizer, scaler, **numbers):
        """Progress and the log record; when due, the decoder's trust (every process), the
        evaluation (drawing frames at the last step only) and the checkpoint."""
        cfg, evaluating = self.cfg, step % self.cfg.eval_every == 0 or step == self.cfg.steps
        self.speeds.append(self.world_size * cfg.batch_size * cfg.grad_accum / (time.perf_counter() - self.started))
        self.bar.update(1)
        self.bar.set_postfix({part: f"{numbers[part + '_loss']:.4f}" for part in ("world", "flow", "decoder")})
        record = {"step": step, **numbers, "samples_per_s": self.speeds[-1]}
        if evaluating:                                     # in every process: saved with the weights
            measure_latent_error(model, *self.error_windows, self.device, self.autocast)
        if self.rank == 0 and evaluating:
            self.metrics = evaluate(model, self.val_frames, self.val_actions, self.device, self.autocast,
                                    cfg.eval_psnr_windows if step == cfg.steps else 0, cfg.euler_steps)
            record.update(self.metrics)
            tqdm.write(format_eval(step, self.metrics))
        if self.log:
            self.log.write(prepare_data.to_json(record) + "\n")
        if self.rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps or self.stopping):
            save_checkpoint(self.ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "scaler": scaler.state_dict(), "step": step, "config": dataclasses.asdict(cfg)})
            self.log.flush()

    def finish(self, model, step):
        """Leave the process group, free the run folder, report the speed; after a stop request,
        exit with the shell's code. Returns (model, the last evaluation's metrics)."""
        if self.world_size > 1:
            for buffer in model.buffers():      # as DDP does before each forward: rank 0's running
                dist.broadcast(buffer, src=0)   # statistics (residual_rms), which each process updated
            dist.destroy_process_group()
        release_run_folder(self.cfg.out_dir)               # another run may use the folder now
        self.say(f"{len(self.speeds)} steps: median {np.median(self.speeds):.1f} samples/s ({self.cfg.size}, "
                 f"{self.cfg.dtype})" if self.speeds else f"{self.ckpt_path} is at step {step} already: raise --steps to train on")
        if self.stopping:
            self.say(f"interrupted: saved step {step} to {self.ckpt_path}; continue with --resume")
            # the shell's convention: 128 + the signal's number (130 Ctrl-C, 143 SIGTERM); 130 when
            # the request came from another process
            raise SystemExit(128 + self.requests[0] if self.requests else 130)
        return model, self.metrics


# -----------------------------------------------------------------------------
# Training helpers: the checks of the config, hardware, the data and the run folder, the optimizer,
# processes, the log, signals


MODEL_FIELDS = ["image_size", "patch_size", "width", "heads", "encoder_depth", "encoder_mlp_ratio", "conditioner_depth",
                "conditioner_mlp_ratio", "predictor_depth", "predictor_mlp_ratio", "decoder_width", "decoder_depth",
                "decoder_heads", "decoder_mlp_ratio", "sampler_depth"]   # the fields that shape the weights
MAY_BE_ZERO = {"warmup_steps", "weight_decay", "bench", "eval_psnr_windows", "sigreg_weight", "vicreg_variance",
               "vicreg_covariance"}
FRACTIONS = {"min_lr_ratio", "ema_start", "ema_end"}
TARGETS = ("ema", "sigreg", "vicreg", "none")


def check_config(cfg):
    """Refuse settings that make no sense before any work starts, naming the flag and its range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type is str and not value.strip():
            raise ValueError(f"--{f.name}: must not be empty")
        if f.type not in (int, float):
            continue
        ok, rule = ((0 <= value < prepare_data.SEEDS, f"between 0 and {prepare_data.SEEDS - 1}") if f.name == "seed" else
                    (0 <= value <= 1, "between 0 and 1") if f.name in FRACTIONS else
                    (value >= 0, "0 or more") if f.name in MAY_BE_ZERO else
                    (value > 0, "at least 1" if f.type is int else "above 0"))
        if not ok:
            raise ValueError(f"--{f.name} {value}: must be {rule}")
        if not math.isfinite(value):                    # --lr inf passes "above 0"
            raise ValueError(f"--{f.name} {value}: must be finite")
    for width, heads in (("width", "heads"), ("decoder_width", "decoder_heads")):
        if getattr(cfg, width) % getattr(cfg, heads) or getattr(cfg, width) % 4:   # 2-D positions: 4 parts
            raise ValueError(f"--{width} {getattr(cfg, width)}: must be divisible by 4 and by --{heads} "
                             f"{getattr(cfg, heads)}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"--image_size {cfg.image_size}: must be divisible by --patch_size {cfg.patch_size}")
    if cfg.target not in TARGETS:
        raise ValueError(f"--target {cfg.target}: choose one of {', '.join(TARGETS)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {cfg.dtype}: choose one of auto, float32, bfloat16, float16")
    if cfg.size not in PRESETS:
        raise ValueError(f"--size {cfg.size}: choose one of auto, {', '.join(PRESETS)}")
    check_device(cfg.device)


def check_device(device):
    """auto, cpu, cuda, cuda:N or mps, and a GPU only where the machine has it. auto never picks
    mps: nobody has measured this project on an Apple GPU yet."""
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: this PyTorch sees no Apple-silicon GPU (MPS); use --device cpu")
    if device not in ("auto", "cpu", "mps"):
        index, count = device.removeprefix("cuda").removeprefix(":"), torch.cuda.device_count()
        if not device.startswith("cuda") or not (index == "" or index.isdigit()):
            raise ValueError(f"--device {device}: choose auto, cpu, cuda, cuda:N or mps")
        if int(index or 0) >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPUs; use --device cpu")


def choose_hardware(cfg, local_rank=0, say=print):
    """The device, and the autocast dtype from what the hardware supports (never from a timing,
    so that every run of a command trains the same way). cfg.dtype records the choice, so that a
    resumed run keeps it. Every later CUDA call goes to this device."""
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    reason = "as set by --dtype or the checkpoint"
    if cfg.dtype == "auto":
        if device.type == "cuda":
            facts = {"gpu_capability": torch.cuda.get_device_capability(device)}
        elif device.type == "mps":
            facts = {"mps_bf16": torch.backends.mps.is_macos_or_newer(14, 0)}
        else:       # private checks in torch.cpu; a build without them counts as "no bf16"
            probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
            facts = {"cpu_bf16": any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)}
        cfg.dtype, reason = autocast_dtype(**facts)
    say(f"device: {device}; precision: {cfg.dtype} ({reason})")
    return device, getattr(torch, cfg.dtype)


def autocast_dtype(gpu_capability=None, cpu_bf16=False, mps_bf16=None):
    """(dtype name, reason) from the hardware's facts. A GPU of compute capability 8.0 or later
    (Ampere: the RTX 3060 is 8.6, the A100 8.0) computes bf16 natively; older ones (the T4 is
    7.5, the V100 7.0) get fp16 with a gradient scaler, since their bf16 is emulated and slow (and
    torch.cuda.is_bf16_supported() counts emulation as support). A CPU gets bf16 only with bf16
    matmul instructions (AVX512-BF16 or AMX); emulated bf16 is slower than float32 there. An Apple
    GPU (MPS) has bf16 from macOS 14 on; before, float32 (fp16 would need a gradient scaler)."""
    if mps_bf16 is not None:
        return ("bfloat16", "MPS on macOS 14 or later: bf16") if mps_bf16 else ("float32", "MPS before macOS 14: no bf16")
    if gpu_capability is not None:
        native = tuple(gpu_capability) >= (8, 0)
        return ("bfloat16" if native else "float16"), (f"GPU compute capability {gpu_capability[0]}.{gpu_capability[1]}: "
                                                       f"bf16 {'native' if native else 'only emulated'}")
    return ("bfloat16", "the CPU has bf16 instructions") if cpu_bf16 else ("float32", "the CPU lacks bf16 instructions")


def auto_size(cuda, resolution):
    """(preset, reason) for --size auto, from the device and the dataset's frame size. The base
    preset reads 224-px frames: on smaller ones it learns nothing more, at 600x tiny's FLOPs. On
    64-px frames tiny it is, on a GPU too: at the quickstart's 1500 steps small came out worse
    than tiny (docs/experiments.md); small pays off only with more data and steps."""
    if cuda and resolution >= PRESETS["base"]["image_size"]:
        return "base", f"a CUDA GPU and {resolution}-px frames: the original's size"
    return "tiny", (f"{'a CUDA GPU' if cuda else 'a CPU'} and {resolution}-px frames"
                    + (": base needs 224-px data (prepare_data.py --res 224)" if cuda else ""))


def autocast_to(device_type, dtype):
    """Mixed precision in dtype; float32 means none."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def open_dataset(cfg):
    """Load the dataset and check it fits this model. Returns (index, train episodes, val episodes)."""
    index, episodes = prepare_data.load_dataset(cfg.data)
    if index["action_columns"] != ACTION_COLUMNS:
        raise ValueError(f"{cfg.data}: its action columns differ from this code's; run prepare_data.py again")
    return index, *prepare_data.split_episodes(cfg.data, index, episodes)


def count_parameters(model):
    """Parameters per part (the target encoder is a copy of the encoder, listed separately)."""
    parts = ["encoder", "action_conditioner", "predictor", "sampler", "decoder", "target_encoder"]
    return {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in parts
            if getattr(model, part) is not None}


def require_trained_dataset(cfg, trained_by):
    """The dataset a run or checkpoint trained on (cfg.data) must still be there; if it moved,
    say so and ask for --data, rather than advising to prepare a new one."""
    if not os.path.exists(os.path.join(cfg.data, "index.json")):
        raise ValueError(f"{cfg.data}: the dataset {trained_by} trained on is not there (moved or deleted?); "
                         "give its folder with --data")


BUILTIN_EPISODES = 64      # episodes of the built-in world built when the default --data is missing


def prepare_run(cfg, say):
    """The data (the built-in world's, built first if the default folder is missing), the fixed
    validation windows, and the run folder (a finished run is never overwritten)."""
    if cfg.data == Config.data and not os.path.exists(os.path.join(cfg.data, "index.json")):
        say(f"{cfg.data} has no dataset yet: building the built-in world's first "
            f"(`python prepare_data.py --synthetic {BUILTIN_EPISODES}` does the same)")
        if int(os.environ.get("RANK", 0)) == 0:
            prepare_data.main(["--synthetic", str(BUILTIN_EPISODES), "--out", cfg.data])
        if dist.is_initialized():
            dist.barrier()                                  # the other processes wait for it
    if cfg.resume:
        require_trained_dataset(cfg, "this run")
    index, train_episodes, val_episodes = open_dataset(cfg)
    val_frames, val_actions, _ = WindowSampler(val_episodes, cfg.eval_horizon, cfg, "--eval_horizon").sample(
        cfg.eval_windows, torch.Generator().manual_seed(1234))    # the same windows every time
    steps = min(MEASURED_STEPS, (max(len(e["frames"]) for e in train_episodes) - 1) // cfg.frame_skip)
    error_windows = WindowSampler(train_episodes, steps, cfg).sample(
        ERROR_WINDOWS, torch.Generator().manual_seed(4321))[:2]   # training windows: the decoder's trust
    say(f"data: {cfg.data}: {len(train_episodes)} train / {len(val_episodes)} val episodes, {index['resolution']}px"
        + (f" (resized to {cfg.image_size} on the device)" if index["resolution"] != cfg.image_size else ""))
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    if int(os.environ.get("RANK", 0)) == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock_run_folder(cfg.out_dir)
    if not cfg.resume and os.path.exists(ckpt_path):
        raise CheckpointError(f"{ckpt_path} already holds a run: continue it with --resume, or choose another --out_dir")
    if not cfg.resume and os.path.exists(log_path) and os.path.getsize(log_path) > 0:
        raise CheckpointError(f"{log_path} holds the log of an earlier run whose ckpt.pt is gone: move or delete "
                              "the log, or choose another --out_dir")
    with contextlib.suppress(FileNotFoundError):
        os.remove(ckpt_path + ".tmp")                       # left by a run killed while saving
    return WindowSampler(train_episodes, cfg.rollout, cfg), val_frames, val_actions, error_windows, ckpt_path


def lock_run_folder(out_dir):
    """Hold a lock on <out_dir>/run.lock while this process lives, so that two runs never write
    one folder (prepare_data.lock_folder)."""
    prepare_data.lock_folder(out_dir, "run.lock", "another run of iwm.py", "--out_dir")


def release_run_folder(out_dir):
    """Give up this process's lock on the run folder (exiting does it too)."""
    prepare_data.release_folder(out_dir)


def non_finite_loss(loss, step, ckpt_path, dtype):
    """The message for a loss that became inf or nan: where the last good state is, and what to try."""
    kept = (f"{ckpt_path} holds the last good state" if os.path.exists(ckpt_path) else "no checkpoint was written yet")
    advice = "a lower --lr" + (" or --dtype float32" if dtype != torch.float32 else "")
    return f"loss became {loss} at step {step}; stopped without saving ({kept}). Try {advice}"


def set_aside_log(out_dir):
    """After a run that stopped before its first checkpoint: its log becomes log.failed.jsonl, so
    that the folder takes a fresh run (there is nothing to resume, and nothing is erased)."""
    log, ckpt = (os.path.join(out_dir, name) for name in ("log.jsonl", "ckpt.pt"))
    if os.path.exists(ckpt) or not os.path.exists(log) or int(os.environ.get("RANK", 0)) > 0:
        return ""
    os.replace(log, os.path.join(out_dir, "log.failed.jsonl"))
    return f"; its log is kept as {os.path.join(out_dir, 'log.failed.jsonl')}, and the folder takes a fresh run"


def make_optimizer(model, cfg, device_type, dtype):
    """AdamW with weight decay on weight matrices only (not on norms, biases or positions) and
    the decoder's learning-rate scale, fused into one kernel on a GPU; and a gradient scaler that
    only acts for float16."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:                             # not the EMA target encoder
            decay = p.ndim >= 2 and "positions" not in name
            scale = cfg.decoder_lr_scale if name.startswith("decoder.") else 1.0
            group = groups.setdefault((decay, scale), {"params": [], "lr_scale": scale,
                                                       "weight_decay": cfg.weight_decay if decay else 0.0})
            group["params"].append(p)
    optimizer = torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=(0.9, 0.95), fused=device_type == "cuda")
    return optimizer, torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


def accumulate_gradients(trained, run, optimizer, scaler):
    """Forward and backward over grad_accum micro-batches of fresh windows, then the gradients
    unscaled and clipped to norm grad_clip; returns the mean loss, its parts and the norm before
    clipping as device tensors, without waiting for the device. (DDP averages the gradients
    across processes on the last micro-batch only.)"""
    losses, accum = {}, run.cfg.grad_accum
    for micro in range(accum):
        batch = [to_device(x, run.device) for x in run.sampler.sample(run.cfg.batch_size)]   # frames, actions, context
        with trained.no_sync() if run.world_size > 1 and micro < accum - 1 else contextlib.nullcontext():
            with run.autocast:
                micro_loss, info = trained(*batch)
            scaler.scale(micro_loss / accum).backward()
        for name, value in {"loss": micro_loss.detach(), **info}.items():
            losses[name] = losses.get(name, 0.0) + value / accum
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), run.cfg.grad_clip)
    return {**losses, "grad_norm": grad_norm}


def to_device(x, device):
    """A CPU tensor on the device. To a GPU through pinned memory and without blocking: the copy
    overlaps the work queued before it, and the host does not wait for it."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def start_processes():
    """Under torchrun (RANK, LOCAL_RANK and WORLD_SIZE set) join the process group: NCCL on GPUs,
    gloo on CPUs. Returns (rank, local rank, number of processes); a plain run is rank 0 of 1."""
    rank, local_rank, world_size = (int(os.environ.get(key, 1 if key == "WORLD_SIZE" else 0))
                                    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if world_size > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
    return rank, local_rank, world_size


def gathered(samples):
    """The samples of every process, in rank order: a regulariser of the batch sees the global
    batch (LeJEPA's code does the same), and its gradient flows back to each process's own."""
    if not dist.is_initialized():
        return samples
    import torch.distributed.nn.functional as differentiable      # all_gather with a backward pass
    return torch.cat(differentiable.all_gather(samples))


def mean_over_processes(values, device, world_size):
    """A few numbers (device tensors or floats) averaged over all processes, as floats. One small
    tensor on the device carries them all: one all-reduce (NCCL reduces only GPU tensors) and one
    copy to the host per step."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values.tolist()


def open_log(cfg, step):
    """Write config.json; open log.jsonl for appending, keeping only the records of steps up to
    `step`: a run killed after its last checkpoint logged steps that the resumed run logs again."""
    prepare_data.write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))   # whole or not at all
    path, kept = os.path.join(cfg.out_dir, "log.jsonl"), []
    with open(path, "a+") as f:
        f.seek(0)
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):   # a line cut short by a kill
                if json.loads(line)["step"] <= step:
                    kept.append(line.rstrip("\n") + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


@contextlib.contextmanager
def stop_requests():
    """Ctrl-C (SIGINT), SIGTERM (a scheduler's preemption, `docker stop`) or SIGHUP (the terminal
    closed) asks to stop: the step finishes, then the run is saved, so a resumed run continues
    exactly as if nothing had happened. The same signal again quits at once. Yields the list of
    requests."""
    requests = []

    def request(signum, frame):
        requests.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        tqdm.write(f"{signal.Signals(signum).name}: stopping after this step (again: quit without saving)")

    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])   # no SIGHUP on Windows
    previous = {s: signal.signal(s, request) for s in signals}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# Benchmark: --bench N times N training steps of the chosen preset on random data


def count_flops(function):
    """FLOPs of one call as PyTorch's FlopCounterMode counts them: matmuls, convolutions and
    attention, forward and (where the call runs one) backward with any recomputation."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def timed(function, device, repeats=1):
    """Seconds per call, waiting for the GPU to finish its queued work."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize()
    return (time.perf_counter() - started) / repeats


def benchmark(cfg):
    """Print parameters per part, samples/s, FLOPs per step and FLOP/s, the fraction of the
    measured matmul peak, the memory of weights and optimizer state, and on a GPU the peak memory."""
    check_config(cfg)
    device, dtype = choose_hardware(cfg)
    torch.manual_seed(cfg.seed)
    model = WorldModel(cfg).to(device).train()
    print("parameters: " + ", ".join(f"{part} {n / 1e6:.2f}M" for part, n in count_parameters(model).items()))
    optimizer, scaler = make_optimizer(model, cfg, device.type, dtype)
    autocast = autocast_to(device.type, dtype)
    frames = torch.randint(0, 256, (cfg.batch_size, cfg.rollout + 1, cfg.image_size, cfg.image_size, 3),
                           dtype=torch.uint8, device=device)
    actions = torch.randn(cfg.batch_size, cfg.rollout, cfg.action_window, len(ACTION_COLUMNS), device=device)

    def step():
        for _ in range(cfg.grad_accum):
            with autocast:
                loss, _ = model(frames, actions, frames[:, 0])
            scaler.scale(loss / cfg.grad_accum).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(cfg.ema_start)

    flops = count_flops(step)                               # one step, before compiling
    if cfg.compile:
        compile_parts(model)
    for _ in range(3 if cfg.compile else 1):                # warm-up (and compilation)
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, cfg.bench)
    # The ceiling to compare with: the fastest of a few large square matmuls in the training precision
    size = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    with autocast:
        peak = 2 * size ** 3 / min(timed(lambda: a @ b, device) for _ in range(6))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    states = (4 * sum(p.numel() for p in model.parameters()) + 12 * trainable) / 2 ** 30
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    print(f"{cfg.size}, batch {cfg.batch_size} x {cfg.grad_accum}, grad_ckpt {cfg.grad_ckpt}, compile {cfg.compile}: "
          f"{cfg.batch_size * cfg.grad_accum / seconds:.1f} samples/s ({seconds:.3f} s per step)\n"
          f"  {flops / 1e12:.3f} TFLOP per step -> {flops / seconds / 1e12:.3f} TFLOP/s; measured {dtype} matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s -> {flops / seconds / peak:.1%} of peak\n"
          f"  memory: weights, gradients and AdamW's two moments in fp32 take {states:.2f} GiB; "
          + (f"peak CUDA memory (max allocated) {memory:.2f} GiB" if memory else "peak memory needs a CUDA GPU"))
    return {"samples_per_s": cfg.batch_size * cfg.grad_accum / seconds, "flops_per_step": flops,
            "fraction_of_peak": flops / seconds / peak, "peak_memory_gib": memory, "states_gib": states}


def compile_parts(model):
    """torch.compile each part (each a plain tensor function); the loops around them stay eager."""
    for part in (model.encoder, model.target_encoder, model.action_conditioner, model.predictor, model.decoder):
        if part is not None:
            part.compile()


# -----------------------------------------------------------------------------
# Main: flags generated from Config; preset, then explicit flags, then the resolved config


def parse_config(argv=None):
    parser = argparse.ArgumentParser(description="Train the JEPA image world model.")
    for f in dataclasses.fields(Config):
        kind = {"action": argparse.BooleanOptionalAction} if f.type is bool else {"type": f.type}
        parser.add_argument(f"--{f.name}", default=None, help=f"default: {f.default}", **kind)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if given.get("resume"):            # the checkpoint's config with the flags on top, the model's shape kept
        path = os.path.join(given.get("out_dir", Config.out_dir), "ckpt.pt")
        state = load_checkpoint(path)
        saved, cfg = saved_config(state), saved_config(state, **given)
        differ = [f"{k}: checkpoint {getattr(saved, k)} vs requested {getattr(cfg, k)}"
                  for k in ["size", "target"] + MODEL_FIELDS if getattr(saved, k) != getattr(cfg, k)]
        if differ:
            raise CheckpointError(f"{path} holds a different model ({', '.join(differ)}); drop those flags or use "
                                  "another --out_dir")
        return cfg
    size = given.get("size", "auto")
    if size == "auto":
        resolution = 64                                    # no dataset yet: the built-in world's
        with contextlib.suppress(prepare_data.DatasetError):
            resolution = prepare_data.read_index(given.get("data", Config.data))["resolution"]
        size, reason = auto_size(torch.cuda.is_available() and given.get("device", "auto") != "cpu", resolution)
        print(f"size: {size} ({reason}; pick with --size)")
    if size not in PRESETS:
        raise ValueError(f"--size {size}: choose one of auto, {', '.join(PRESETS)}")
    return Config(**{**PRESETS[size], **given, "size": size})


def main(argv=None):
    prepare_data.one_line_warnings()
    cfg = None
    try:
        cfg = parse_config(argv)
        check_config(cfg)                  # before anything is printed or started
        if int(os.environ.get("RANK", 0)) == 0:
            print("config: " + json.dumps(dataclasses.asdict(cfg)))
        if cfg.bench:
            benchmark(cfg)
        else:
            fit(cfg)
    except FloatingPointError as e:        # a diverged run: its log must not block the next one
        raise SystemExit(f"error: {e}{set_aside_log(cfg.out_dir)}")
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:                   # a folder that cannot be written, a file that vanished
        raise SystemExit(f"error: {prepare_data.describe(e, cfg and cfg.out_dir)}")
    except KeyboardInterrupt:
        print("interrupted")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
