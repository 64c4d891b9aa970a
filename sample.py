"""
sample.py: watch the world model imagine, and put its latents to work.

    python sample.py                                     # rollout GIFs + a metric table (validation episodes)
    python sample.py --actions turn_left,walk_forward    # "what if": the same start under scripted actions
    python sample.py --futures 4                         # four possible futures of each start, side by side
    python sample.py --video EP.mp4                      # a raw VPT episode (EP.jsonl beside it)
    python sample.py --probe       # linear probes: yaw, pitch, position from pooled latents vs a random encoder
    python sample.py --surprise    # prediction error along episodes with a teleport in the middle
    python sample.py --plan        # reach goal images in the built-in world by CEM planning vs a random policy

A rollout runs open loop for --horizon model steps from one real frame. Its GIF shows, side by
side, the true future, one possible future the model imagines (sampled), the mean of the futures
it cannot tell apart (what it plans with), and the decoded target latent (reconstruction), with
the actions of each step under every panel. --futures K draws K possible futures of the same
start and inputs, and a map of where they differ.
"""
import argparse
import copy
import math
import os
import sys
import time

import cv2
import numpy as np
import torch
from tqdm import tqdm

import iwm
import prepare_data
from prepare_data import ACTION_COLUMNS, COLUMN

# -----------------------------------------------------------------------------
# Rollouts: the metric table on validation windows, then GIFs

# Scripts for --actions: the columns held on every frame (3 degrees per frame: 60 per second)
SCRIPTS = {"stand_still": {}, "turn_left": {"camera_yaw": -3.0}, "turn_right": {"camera_yaw": 3.0},
           "look_up": {"camera_pitch": -2.0}, "look_down": {"camera_pitch": 2.0},
           "walk_forward": {"forward": 1.0}, "jump_forward": {"forward": 1.0, "jump": 1.0}}
LABEL_HEIGHT, BAR_HEIGHT = 16, 30
KEYS_SHOWN = [("forward", "W"), ("left", "A"), ("back", "S"), ("right", "D"), ("jump", "jump"),
              ("sprint", "sprint"), ("sneak", "sneak"), ("attack", "atk"), ("use", "use")]


def draw_actions(bar, step_actions, step, horizon):
    """The step number, the keys and buttons held during the step, and an arrow for the camera
    move it made (summed over the step's frames)."""
    font, white, grey = cv2.FONT_HERSHEY_SIMPLEX, (255, 255, 255), (90, 90, 90)
    cv2.putText(bar, f"step {step}/{horizon}", (3, 12), font, 0.35, white, 1, cv2.LINE_AA)
    held = step_actions.max(axis=0) if len(step_actions) else np.zeros(len(COLUMN))
    x, y = 70, 12                         # W A S D after the step number, the rest below
    for name, label in KEYS_SHOWN:
        cv2.putText(bar, label, (x, y), font, 0.35, (80, 220, 255) if held[COLUMN[name]] > 0.5 else grey, 1, cv2.LINE_AA)
        x, y = (3, 26) if label == "D" else (x + 7 * len(label) + 5, y)
    yaw, pitch = (step_actions[:, COLUMN[c]].sum() for c in ("camera_yaw", "camera_pitch"))
    center, length = (bar.shape[1] - 14, 15), np.hypot(yaw, pitch)
    cv2.circle(bar, center, 11, grey, 1)
    if length > 0.1:     # arrow length grows like log(degrees): 1 degree and 90 both show
        reach = 10 * min(np.arcsinh(length / 2) / np.arcsinh(30), 1.0)
        tip = (int(center[0] + reach * yaw / length), int(center[1] + reach * pitch / length))
        cv2.arrowedLine(bar, center, tip, white, 1, cv2.LINE_AA, tipLength=0.4)


def to_pixels(images):
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8 RGB."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def compose_gif(path, panels, labels, panel_actions, frame_skip, scale):
    """panels: (steps + 1, h, w, 3) uint8 RGB each; panel_actions: the per-frame action rows
    (steps * frame_skip, A) that drive each. Writes an animated GIF, one frame per model step."""
    frames, horizon = [], len(panels[0]) - 1
    for step in range(horizon + 1):
        columns = []
        for images, label, actions in zip(panels, labels, panel_actions):
            image = cv2.resize(images[step][:, :, ::-1], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            top, bar = (np.zeros((height, image.shape[1], 3), np.uint8) for height in (LABEL_HEIGHT, BAR_HEIGHT))
            cv2.putText(top, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
            draw_actions(bar, actions[max(step - 1, 0) * frame_skip:step * frame_skip], step, horizon)
            columns += [np.concatenate([top, image, bar]), np.full((LABEL_HEIGHT + image.shape[0] + BAR_HEIGHT, 2, 3), 255, np.uint8)]
        frames.append(np.concatenate(columns[:-1], axis=1))
    animation = cv2.Animation()
    animation.loop_count, animation.frames = 0, frames
    animation.durations = [400] + [250] * horizon      # milliseconds; the start lingers
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp.gif")   # OpenCV reads the format off the name
    try:
        if not cv2.imwriteanimation(tmp, animation):
            raise OSError(f"OpenCV could not write {path}")
        os.replace(tmp, path)                          # whole or not at all: a kill never leaves half a GIF
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


FUTURES_SAMPLED = 16      # possible futures sampled per window for the table (the first 4 drawn)


def print_table(title, columns, rows):
    """columns: (heading, key, digits); rows: dicts with those keys."""
    print(title)
    print(" | ".join(heading for heading, _, _ in columns))
    for row in rows:
        print(" | ".join(f"{iwm.show(row[key], digits):>{len(heading)}s}" for heading, key, digits in columns))


def print_metrics(metrics, horizon):
    """The rollout tables: the mean's rows, the sampled futures' rows, and where nothing changed."""
    rows = [{"h": h + 1, **{k: v[h] for k, v in metrics.items() if isinstance(v, list) and len(v) == horizon}}
            for h in range(horizon)]
    shown = [row for row in rows if row["h"] in (1, 2, 4, 8, 16, horizon)]    # metrics.json has every h
    print_table("The mean prediction (metrics.json has every h). PSNR (dB, of the mean squared error over the windows)\n"
                "and SSIM against the true frame, of the mean / repeating the start frame / the decoded true latent;\n"
                "sharpness: the mean's Laplacian variance / the truth's; grid: the mean's colour step across patch\n"
                "borders / across other pixel borders (a real frame: about 1; the truth's is in metrics.json);\n"
                "controllability: PSNR with the true actions - with another window's (dB)",
                [(" h", "h", 0), ("pred/copy", "pred_copy", 3), ("PSNR mean", "psnr_prediction", 2),
                 ("repeat", "psnr_repeat_start", 2), ("recon", "psnr_reconstruction", 2), ("SSIM mean", "ssim_prediction", 3),
                 ("repeat", "ssim_repeat_start", 3), ("recon", "ssim_reconstruction", 3), ("sharpness", "sharpness", 2),
                 ("grid", "grid_prediction", 2), ("controllability", "controllability", 2)], shown)
    if "psnr_sample" in metrics:
        print_table(f"Sampled futures ({iwm.LATENT_EULER_STEPS} Euler steps each): PSNR of one, and of the best of "
                    f"{iwm.FUTURES_DRAWN} per frame; sharpness, grid and controllability of one",
                    [(" h", "h", 0), ("PSNR sample", "psnr_sample", 2), (f"best of {iwm.FUTURES_DRAWN}", "psnr_best_sample", 2),
                     ("sharpness", "sharpness_sample", 2), ("grid", "grid_sample", 2),
                     ("controllability", "controllability_sample", 2)], shown)
        print("the average of K sampled futures against the mean (latent MSE / the mean's error; 1/K if they spread as "
              "the truth does): " + ", ".join(f"K = {k}: {iwm.show(metrics.get(f'gap_{k}'), 3)}" for k in (1, 4, 16)))
    print_table("Where the true view has not changed since the start frame (n/a: no such window)",
                [(" h", "h", 0), ("windows", "still_windows", 0), ("PSNR mean", "psnr_still", 2),
                 ("sharpness", "sharpness_still", 2)], shown)
    print(f"action sensitivity {iwm.show(metrics['action_sensitivity'], 2)}, target std {iwm.show(metrics['target_std'], 3)}")
    return rows


def spread_map(pictures):
    """(K, S, 3, H, W) in [-1, 1] -> (S, H, W, 3) uint8: how much K drawn futures differ at each
    pixel (the std over them, mean over colours), bright where they disagree."""
    spread = pictures.float().std(dim=0).mean(dim=1)                            # (S, H, W)
    grey = (spread / 0.5).clamp(0, 1).mul(255).byte().cpu().numpy()            # std 0.5: white
    return np.stack([cv2.applyColorMap(g, cv2.COLORMAP_INFERNO)[:, :, ::-1] for g in grey])


def run_rollouts(model, cfg, episodes, args, out):
    """The metric tables on args.windows windows, then args.n GIFs: true future | a sampled future |
    the mean | reconstruction; with --actions the mean under each script from the same start; with
    --futures K, K sampled futures side by side and how much they differ."""
    sampler = iwm.WindowSampler(episodes, args.horizon, cfg, "--horizon")
    print(f"{len(sampler.episodes)} episodes; {args.horizon} steps of {cfg.frame_skip} frames; "
          f"{args.euler_steps} Euler steps per drawn frame")
    frames, actions, _ = sampler.sample(args.windows, torch.Generator().manual_seed(args.seed))
    metrics = iwm.evaluate(model, frames, actions, args.device, iwm.autocast_to(args.device.type, getattr(torch, cfg.dtype)),
                           psnr_windows=args.windows, euler_steps=args.euler_steps, futures=FUTURES_SAMPLED)
    table = print_metrics(metrics, args.horizon)
    for i, (episode, start) in enumerate(tqdm(sampler.sample_positions(args.n, torch.Generator().manual_seed(args.seed + 1)),
                                              desc="rollout GIFs", unit="gif")):
        frames, recorded = (torch.from_numpy(x)[None].to(args.device) for x in sampler.window_at(episode, start))
        n_rows = args.horizon * cfg.frame_skip
        truth = to_pixels(iwm.normalize_frames(frames[0], cfg.image_size))
        panels, labels, rows = [truth], ["true future"], [np.array(episode["actions"][start:start + n_rows])]
        history = torch.from_numpy(iwm.action_window(episode["actions"], start, cfg.action_window)).to(args.device)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        with torch.no_grad():
            start_latent, targets = model.encode(frames[:, :1])[:, 0], model.encode_target(frames)[0]   # (1, N, D), (S, N, D)
            sample = lambda: model.rollout(start_latent, recorded, targets[:1], iwm.LATENT_EULER_STEPS, generator)[0]  # noqa: E731
            mean = ("mean", model.rollout(start_latent, recorded, targets[:1])[0], rows[0], True)
            if args.futures:
                runs = [(f"future {k + 1}", sample(), rows[0], True) for k in range(args.futures)]
            elif args.actions:
                runs = [mean]
            else:
                runs = [("sampled", sample(), rows[0], True), mean, ("reconstruction", targets[1:], rows[0], False)]
            for script in args.actions:   # the recorded rows before the start, the script from the start on
                script_rows = np.zeros((n_rows, len(ACTION_COLUMNS)), np.float32)
                for column, value in SCRIPTS[script].items():
                    script_rows[:, COLUMN[column]] = value
                latents = imagine(model, (start_latent[0], targets[0]), history, torch.from_numpy(script_rows)[None])[0]
                runs.append((script, latents, script_rows, True))
            drawn = [iwm.draw_rollout(model, latents[None], frames[:, 0], predicted, args.euler_steps, generator)[0]
                     for _, latents, _, predicted in runs]
        for (label, _, action_rows, _), pictures in zip(runs, drawn):
            panels.append(np.concatenate([truth[:1], to_pixels(pictures)]))
            labels.append(label)
            rows.append(action_rows)
        if args.futures:
            panels.append(np.concatenate([np.zeros_like(truth[:1]), spread_map(torch.stack(drawn))]))
            labels.append("how they differ")
            rows.append(rows[0])
        name = "futures" if args.futures else "rollout"
        compose_gif(os.path.join(out, f"{name}_{i}" + "".join(f"_{s}" for s in args.actions) + ".gif"), panels, labels,
                    rows, cfg.frame_skip, args.scale)
    keys = [k for k in metrics if k.startswith(("action_sensitivity", "target_std", "gap_"))]
    return "metrics", {"windows": args.windows, "euler_steps": args.euler_steps, "per_horizon": table,
                       **{k: metrics[k] for k in keys}}


# -----------------------------------------------------------------------------
# Probes: can a linear map read the player's state (yaw, pitch, position) off the latents?

PROBE_TARGETS = ["sin yaw", "cos yaw", "pitch", "x", "y", "z", "distance"]
# distance: to the block under the crosshair, where the built-in world records it, on the frames
# where that block is nearer than the fog: there only the 3-D scene tells it (beyond, the fog's
# colour and the sky do, and a random network reads it as well as ours)
POOLINGS = ["mean", "rows+columns"]


@torch.no_grad()
def pooled_latents(model, frames, chunk=256):
    """Features per frame, two ways: "mean", the encoder's tokens averaged over the image (D);
    "rows+columns", averaged along each row and each column of the token grid (2 * grid * D),
    which keeps where things are along one axis (the horizon's height, say)."""
    device, pooled = next(model.parameters()).device, {name: [] for name in POOLINGS}
    for i in range(0, len(frames), chunk):
        tokens = model.encode(torch.from_numpy(np.array(frames[i:i + chunk]))[None].to(device))[0].float().cpu()
        pooled["mean"].append(tokens.mean(dim=1))
        pooled["rows+columns"].append(rows_and_columns(tokens, model.cfg))
    return {name: torch.cat(parts) for name, parts in pooled.items()}


def fit_ridge(features, targets, l2=1e-3):
    """Linear (ridge) regression on standardised features, solved in closed form:
    W = (X^T X + l2 n I)^-1 X^T (Y - mean Y). Returns a function features -> predictions."""
    features, targets = features.double(), targets.double()
    mean, std, offset = features.mean(0), features.std(0) + 1e-6, targets.mean(0)
    x = (features - mean) / std
    weights = torch.linalg.solve(x.T @ x + l2 * len(x) * torch.eye(x.shape[1], dtype=x.dtype), x.T @ (targets - offset))
    return lambda new: ((new.double() - mean) / std) @ weights + offset


def r_squared(predicted, targets):
    """Per column: 1 - squared error / variance. 1 is perfect; 0 is no better than the mean; NaN
    (cannot be computed) where the targets do not vary, as with one validation frame."""
    targets = targets.double()
    variance = (targets - targets.mean(0)).pow(2).sum(0)
    return torch.where(variance > 0, 1 - (predicted - targets).pow(2).sum(0) / variance, float("nan"))


def probe_scores(features, targets, val_features, val_targets, l2):
    """R^2 of one ridge probe per target column, each fit and scored on the rows where its target
    is known (the distance only near the player); NaN with fewer than 2 such training rows."""
    scores = []
    for column in range(targets.shape[1]):
        known, known_val = targets[:, column].isfinite(), val_targets[:, column].isfinite()
        if known.sum() < 2:
            scores.append(float("nan"))
            continue
        fit = fit_ridge(features[known], targets[known, column:column + 1], l2)
        scores.append(r_squared(fit(val_features[known_val]), val_targets[known_val, column:column + 1]).item())
    return scores


def chosen_penalty(features, targets, penalties):
    """The ridge penalty whose probe, fit on the first 4/5 of the rows (the windows, episode after
    episode), best predicts the last fifth (the mean R^2 over the targets): chosen on training
    data, so the validation score stays honest."""
    cut = len(features) * 4 // 5
    return max(penalties, key=lambda l2: r_squared(fit_ridge(features[:cut], targets[:cut], l2)(features[cut:]),
                                                   targets[cut:]).nanmean().item())


def probe_data(model, episodes, every, columns):
    """Pooled latents of every `every`-th frame, and the recorded state there as targets: sin and
    cos yaw, then state columns 1 .. columns - 1 (n, columns + 1); the distance NaN beyond FOG_START."""
    features, targets = [], []
    for episode in tqdm(episodes, desc="probe features", unit="episode", leave=False):
        state = np.asarray(episode["state"][::every, :columns], np.float64)
        distance = state[:, len(prepare_data.STATE_COLUMNS):]                  # (n, 0) or (n, 1)
        distance[distance >= prepare_data.FOG_START] = np.nan
        features.append(pooled_latents(model, np.asarray(episode["frames"][::every])))
        targets.append(np.stack([np.sin(np.radians(state[:, 0])), np.cos(np.radians(state[:, 0])), *state[:, 1:].T], axis=1))
    return {name: torch.cat([f[name] for f in features]) for name in POOLINGS}, torch.from_numpy(np.concatenate(targets))


IMAGINED_STEPS = (4, 8)     # model steps ahead whose predicted latent the imagination probe reads
IMAGINATION_EVERY = 4       # frames between the probe's windows
IMAGINATION_L2 = (1e-3, 1e-2, 1e-1, 1.0)   # its ridge penalties: each probe takes the one that scores
                                            # best on the last fifth of its training windows
CHANGES = ["yaw", "pitch", "forward", "right"]   # over those steps: the view's turn and the move in the
                                                 # player's own frame at the start (degrees, blocks)


def view_and_move_change(start, end):
    """How the recorded state (yaw, pitch, x, y, z) changed from start to end (n, 5) -> (n, 4):
    the turn and tilt (degrees, the turn wrapped to -180..180) and the move forward and to the
    right in the player's frame at the start (blocks, across the world's wrapping edges)."""
    turn = (end[:, 0] - start[:, 0] + 180) % 360 - 180
    half = prepare_data.WORLD_SIZE / 2
    dx, dz = ((end[:, i] - start[:, i] + half) % prepare_data.WORLD_SIZE - half for i in (2, 4))
    yaw = np.radians(start[:, 0])            # forward is (-sin yaw, cos yaw) in (x, z), as the world moves
    return np.stack([turn, end[:, 1] - start[:, 1], -np.sin(yaw) * dx + np.cos(yaw) * dz,
                     -np.cos(yaw) * dx - np.sin(yaw) * dz], axis=1)


@torch.no_grad()
def imagination_data(model, cfg, episodes, every):
    """Windows every `every` frames of each episode. Features: the rows+columns pooling of the
    start latent beside that of the latent the model predicts k steps ahead under the recorded
    inputs, for each k in IMAGINED_STEPS; of the start latent twice (the model imagines nothing);
    and of the start latent beside the recorded inputs of those k steps themselves (a linear read
    of the inputs: a bar, not a proof). Targets: view_and_move_change over k steps."""
    features = {k: [] for k in IMAGINED_STEPS + ("start twice",) + tuple(("inputs", k) for k in IMAGINED_STEPS)}
    targets = {k: [] for k in IMAGINED_STEPS}
    device, span = next(model.parameters()).device, max(IMAGINED_STEPS) * cfg.frame_skip
    for episode in tqdm(episodes, desc="imagination features", unit="episode", leave=False):
        starts = np.arange(0, len(episode["frames"]) - span, every)
        if not len(starts):
            continue
        frames = torch.from_numpy(np.asarray(episode["frames"][starts]))[:, None].to(device)     # (n, 1, H, W, 3)
        windows = torch.from_numpy(np.stack([[iwm.action_window(episode["actions"], t + (k + 1) * cfg.frame_skip,
                                                                 cfg.action_window) for k in range(max(IMAGINED_STEPS))]
                                             for t in starts])).to(device)                       # (n, k, K, A)
        latent, base = model.encode(frames)[:, 0], model.encode_target(frames)[:, 0]              # (n, N, D)
        predicted = model.rollout(latent, windows, base)                                          # (n, k, N, D)
        start = rows_and_columns(latent, cfg)
        features["start twice"].append(torch.cat([start, start], dim=1))
        state = np.asarray(episode["state"], np.float64)
        for k in IMAGINED_STEPS:
            features[k].append(torch.cat([start, rows_and_columns(predicted[:, k - 1], cfg)], dim=1))
            inputs = np.stack([episode["actions"][t:t + k * cfg.frame_skip] for t in starts])   # (n, k*skip, A)
            features["inputs", k].append(torch.cat([start, torch.from_numpy(inputs).flatten(1).float()], dim=1))
            targets[k].append(view_and_move_change(state[starts], state[starts + k * cfg.frame_skip]))
    return ({k: torch.cat(v) for k, v in features.items()},
            {k: torch.from_numpy(np.concatenate(v)) for k, v in targets.items()})


def rows_and_columns(tokens, cfg):
    """Tokens (n, N, D) averaged along each row and each column of the token grid: (n, 2 * grid * D)."""
    grid = tokens.float().cpu().unflatten(1, (cfg.image_size // cfg.patch_size, -1))             # (n, g, g, D)
    return torch.cat([grid.mean(dim=2).flatten(1), grid.mean(dim=1).flatten(1)], dim=1)


def run_probes(model, cfg, train_episodes, val_episodes, args):
    """Ridge probes fit on training episodes, R^2 on validation episodes; a randomly initialised
    model is the baseline."""
    train_episodes, val_episodes = [e for e in train_episodes if "state" in e], [e for e in val_episodes if "state" in e]
    if not train_episodes or not val_episodes:
        raise SystemExit(f"error: {cfg.data}: the probe needs recorded state (yaw, pitch, position) "
                         "in both training and validation episodes")
    columns = min(episode["state"].shape[1] for episode in train_episodes + val_episodes)   # 6: distance too
    targets = PROBE_TARGETS[:columns + 1]
    torch.manual_seed(args.seed)
    scores = {}
    for name, encoder in (("trained", model), ("random init", iwm.WorldModel(cfg).to(args.device).eval())):
        (train_features, train_targets), (val_features, val_targets) = (
            probe_data(encoder, episodes, args.probe_every, columns) for episodes in (train_episodes, val_episodes))
        for pooling in POOLINGS:
            scores[f"{name}, {pooling}"] = dict(zip(targets, probe_scores(
                train_features[pooling], train_targets, val_features[pooling], val_targets, args.probe_l2)))
    print(f"linear probe R^2 on {len(val_episodes)} validation episodes (fit on {len(train_episodes)} training "
          f"episodes, every {args.probe_every} frame(s), ridge l2 {args.probe_l2})"
          + (f"; distance: to the block under the crosshair, where nearer than {prepare_data.FOG_START:g} blocks"
             if columns > len(prepare_data.STATE_COLUMNS) else ""))
    print(f"{'encoder, pooling':28s}" + "".join(f"{t:>9s}" for t in targets))
    for name, values in scores.items():
        print(f"{name:28s}" + "".join(f"{iwm.show(v, 3):>9s}" for v in values.values()))
    imagination = {}
    for name, world_model in (("trained", model), ("random init", iwm.WorldModel(cfg).to(args.device).eval())):
        (train_features, train_targets), (val_features, val_targets) = (
            imagination_data(world_model, cfg, episodes, IMAGINATION_EVERY) for episodes in (train_episodes, val_episodes))
        for k in IMAGINED_STEPS:
            for given, key in ((f"start + predicted {k}", k), ("start twice", "start twice"),
                               ("start + the inputs themselves", ("inputs", k))):
                l2 = chosen_penalty(train_features[key], train_targets[k], IMAGINATION_L2)
                fit = fit_ridge(train_features[key], train_targets[k], l2)
                imagination[f"{name}, {given}, change over {k}"] = dict(
                    zip(CHANGES, r_squared(fit(val_features[key]), val_targets[k]).tolist()), l2=l2)
    print(f"imagination probe R^2: how the view and position change over k steps ({IMAGINED_STEPS} x "
          f"{cfg.frame_skip} frames), read off the start latent beside the one predicted k steps ahead (rows+columns "
          f"pooling, windows every {IMAGINATION_EVERY} frames, ridge l2 chosen from {IMAGINATION_L2})")
    width = max(map(len, imagination))
    print(f"{'world model, features, steps':{width}s}" + "".join(f"{t:>9s}" for t in CHANGES + ["l2"]))
    for name, values in imagination.items():
        print(f"{name:{width}s}" + "".join(f"{iwm.show(v, 3):>9s}" for v in values.values()))
    return "probe", {"r_squared": scores, "imagination_r_squared": imagination}


# -----------------------------------------------------------------------------
# Surprise: the prediction error along an episode spikes when the world jumps


def played_episode(seed, model_steps, cfg, teleport_step=None):
    """The scripted player in the built-in world for `model_steps` steps (moved half the world
    away just after the frame of teleport_step). Returns frames (model_steps + 1, H, W, 3) and
    action windows (model_steps, K, A), made by the same converter as the dataset."""
    world, player = prepare_data.World(seed), prepare_data.ScriptedPlayer(seed)
    frames, lines, previous = [], [], prepare_data.PlayerInput()
    for tick in range(model_steps * cfg.frame_skip + 1):
        if tick % cfg.frame_skip == 0:
            frames.append(prepare_data.dataset_frame(world.frame(), cfg.image_size))
        if teleport_step is not None and tick == teleport_step * cfg.frame_skip + 1:
            world.pos[[0, 2]] = (world.pos[[0, 2]] + prepare_data.WORLD_SIZE / 2) % prepare_data.WORLD_SIZE
            world.pos[1] = world.ground_at(world.pos[0], world.pos[2])
        inp = player.act(world)
        lines.append(world.line(tick, inp, previous))
        world.step(inp)
        previous = inp
    rows, _ = prepare_data.actions_from_lines(lines)
    windows = np.stack([iwm.action_window(rows, (k + 1) * cfg.frame_skip, cfg.action_window) for k in range(model_steps)])
    return torch.from_numpy(np.stack(frames)), torch.from_numpy(windows)


@torch.no_grad()
def surprise(model, frames, actions):
    """Per model step of an episode, frames (T+1, H, W, 3) and actions (T, K, A): the per-token
    MSE between the prediction from frame t and the target latent of frame t+1 -> (T,)."""
    latents, targets = model.encode(frames[None])[0], model.encode_target(frames[None])[0]
    return iwm.jepa_loss(model.predict_next(latents[:-1], actions, targets[:-1]), targets[1:]).mean(dim=-1)


def run_surprise(model, cfg, args, model_steps=40, teleport_step=20):
    """The teleport step's error against the median error of the other steps, per episode."""
    ratios, largest = [], 0
    for trial in tqdm(range(args.trials), desc="surprise episodes", unit="episode", leave=False):
        frames, windows = played_episode(10_000 + trial, model_steps, cfg, teleport_step)
        errors = surprise(model, frames.to(args.device), windows.to(args.device)).cpu().numpy()
        median = np.median(np.delete(errors, teleport_step))
        if median > 0:                                      # else the ratio cannot be computed
            ratios.append(errors[teleport_step] / median)
        largest += int(errors.argmax() == teleport_step)
        if trial == 0:
            tqdm.write(f"prediction error (x1000) per step of episode 1, teleported between frames "
                       f"{teleport_step} and {teleport_step + 1}:\n  " + " ".join(f"{1000 * e:.0f}" for e in errors))
    median, lowest, highest = (float(f(ratios)) if ratios else None for f in (np.median, np.min, np.max))
    print(f"surprise over {args.trials} teleport episodes: the teleport step's error is {iwm.show(median, 1)}x "
          f"the median step's (median over the {len(ratios)} episodes where the other steps' error is not 0; lowest "
          f"{iwm.show(lowest, 1)}x, highest {iwm.show(highest, 0)}x); it is the episode's largest error in "
          f"{largest} of {args.trials}")
    return "surprise", {"teleport_over_median_step": median, "lowest": lowest, "teleport_step_largest": largest,
                        "trials": args.trials}


# -----------------------------------------------------------------------------
# Planning in latent space: the cross-entropy method over action sequences, executed by
# model-predictive control in the built-in world

def cem(cost, mean, std, low, high, iterations=4, population=32, elites=6, keep=3, correlation=0.0, generator=None):
    """The cross-entropy method: minimise cost over a box [low, high]. Sample a population around
    mean (Gaussian, std), score every sample, refit mean and std to the best `elites`, repeat.
    cost maps (population, *mean.shape) samples to (population,) costs. With correlation > 0 the
    noise is correlated along the first axis (time): each sample shares one offset across it, so
    steady turns are drawn as often as jittery ones. As in iCEM (Pinneri et al. 2020), the best
    `keep` samples join the next population and the best sample is returned, not the mean: when
    the elites sit in two modes (turn left, turn right), their mean can be worse than either.
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


# What the planner controls per model step (held for frame_skip frames): camera yaw and pitch in
# degrees per frame, and the forward key (pressed when > 0.5). The box keeps turns within what the
# training data shows (about 100 degrees per second at most).
PLAN_CONTROLS = ["camera_yaw", "camera_pitch", "forward"]
PLAN_LOW, PLAN_HIGH = torch.tensor([-5.0, -3.0, 0.0]), torch.tensor([5.0, 3.0, 1.0])
GOAL_STEPS = 4            # model steps of the hidden action sequence that makes a goal
EXTRA_STEPS = 2           # the agent gets a little more time than the hidden sequence took


def controls_to_rows(controls, frame_skip):
    """(..., T, 3) planner controls -> (..., T * frame_skip, A) per-frame action rows."""
    rows = torch.zeros(*controls.shape[:-1], len(ACTION_COLUMNS))
    for i, name in enumerate(PLAN_CONTROLS):
        value = controls[..., i]
        rows[..., COLUMN[name]] = (value > 0.5).float() if name == "forward" else value
    return rows.repeat_interleave(frame_skip, dim=-2)


@torch.no_grad()
def imagine(model, start, history, rows):
    """Roll out planned per-frame action rows (P, T * frame_skip, A) from one frame's latents,
    start = (encoded, target) (N, D) each, given the K recorded rows before it, history (K, A).
    Returns latents (P, T, N, D)."""
    K, skip = history.shape[0], model.cfg.frame_skip
    rows = torch.cat([history.expand(len(rows), -1, -1), rows.to(history.device)], dim=1)
    # model step k's window: the K rows before frame (k + 1) * skip, as action_window gives in training
    windows = torch.stack([rows[:, (k + 1) * skip:(k + 1) * skip + K] for k in range((rows.shape[1] - K) // skip)], dim=1)
    latent, target = (z.expand(len(rows), -1, -1) for z in start)
    return model.rollout(latent, windows.to(latent.device), target)


def plan(model, start, goal, history, horizon, init=None, generator=None, iterations=4):
    """Controls (horizon, 3) whose imagined last latent is closest to the goal latent (N, D).
    init: a previous plan to start from (model-predictive control shifts and reuses it).
    Time-correlated samples (correlation 0.9) find steady turns (docs/planning.md)."""
    def cost(controls):
        final = imagine(model, start, history, controls_to_rows(controls, model.cfg.frame_skip))[:, -1]
        return iwm.jepa_loss(final, goal.expand_as(final)).mean(dim=-1).float().cpu()

    mean = (PLAN_LOW + PLAN_HIGH).expand(horizon, -1) / 2 if init is None else init
    return cem(cost, mean, (PLAN_HIGH - PLAN_LOW).expand(horizon, -1) / 2, PLAN_LOW, PLAN_HIGH, iterations,
               correlation=0.9, generator=generator)


def make_goal(seed, kind, cfg):
    """A start (the world) and a goal: what the player sees after a hidden sequence of turning
    (30-80 degrees of yaw, up to 20 of pitch) or walking (GOAL_STEPS steps forward with up to 30
    degrees of turn). A start walled in on every side moves to the next world, seed + 1,000,000.
    Returns (world, goal frame, goal state)."""
    for world_seed in range(seed, seed + 10_000_000, 1_000_000):
        goal = goal_in_world(world_seed, kind, cfg)
        if goal is not None:
            return goal
    raise ValueError(f"worlds {seed} to {world_seed}: no direction to walk in from the start; try another --goal_seed")


def goal_in_world(seed, kind, cfg):
    """make_goal in the world of this seed, or None if no walk of 100 directions gets away from
    the start (a walk that a tree or cliff blocks is redrawn in another direction)."""
    rng, world = np.random.default_rng(seed), prepare_data.World(seed)
    world.pitch = float(rng.uniform(-15, 25))
    ticks = GOAL_STEPS * cfg.frame_skip
    for _ in range(100):
        if kind == "turning":
            yaw, pitch, forward = rng.choice([-1, 1]) * rng.uniform(30, 80), rng.uniform(-20, 20), 0.0
        else:
            yaw, pitch, forward = rng.uniform(-30, 30), rng.uniform(-5, 5), 1.0
        goal_world = copy.deepcopy(world)
        for row in controls_to_rows(torch.tensor([[yaw / ticks, pitch / ticks, forward]] * GOAL_STEPS), cfg.frame_skip).numpy():
            goal_world.step(prepare_data.input_from_action(row))
        if kind == "turning" or np.linalg.norm(goal_world.pos - world.pos) > 0.7 * prepare_data.WALK * ticks:
            return world, prepare_data.dataset_frame(goal_world.frame(), cfg.image_size), goal_world.state()
        world.yaw = float(rng.uniform(-180, 180))             # a blocked walk is no walk: turn elsewhere
    return None


def reached(state, goal, kind):
    """Success: camera within 15 degrees of the goal's yaw and pitch, and for walking goals within
    1.5 blocks of the goal position."""
    close = abs((state[0] - goal[0] + 180) % 360 - 180) <= 15 and abs(state[1] - goal[1]) <= 15
    return close and (kind == "turning" or np.linalg.norm(state[2:] - goal[2:]) <= 1.5)


def run_episode(model, world, goal_latent, cfg, policy, generator, iterations):
    """Model-predictive control: plan, execute one model step, look, plan again, until the budget
    is spent. policy "plan" uses CEM; "random" draws controls uniformly from the same box. Returns
    the frames seen, the latents imagined for each step, the executed rows and the plan times."""
    device = next(model.parameters()).device
    history = torch.zeros(cfg.action_window, len(ACTION_COLUMNS), device=device)   # standing still
    seen, imagined, executed, seconds, controls = [prepare_data.dataset_frame(world.frame(), cfg.image_size)], [], [], [], None
    for step in range(GOAL_STEPS + EXTRA_STEPS):
        horizon = GOAL_STEPS + EXTRA_STEPS - step          # plan to the end of the budget, execute the start
        if policy == "random":
            controls = PLAN_LOW + (PLAN_HIGH - PLAN_LOW) * torch.rand(horizon, len(PLAN_CONTROLS), generator=generator)
        else:
            with torch.no_grad(), iwm.autocast_to(device.type, getattr(torch, cfg.dtype)):
                frame = torch.from_numpy(seen[-1])[None, None].to(device)
                start = (model.encode(frame)[0, 0], model.encode_target(frame)[0, 0])
                started = time.perf_counter()
                controls, _ = plan(model, start, goal_latent, history, horizon, None if controls is None else controls[1:],
                                   generator, iterations)
                seconds.append(time.perf_counter() - started)
                imagined.append(imagine(model, start, history, controls_to_rows(controls[None, :1], cfg.frame_skip))[0, 0].float())
        rows = controls_to_rows(controls[:1], cfg.frame_skip)
        for row in rows.numpy():
            world.step(prepare_data.input_from_action(row))
        seen.append(prepare_data.dataset_frame(world.frame(), cfg.image_size))
        executed.append(rows)
        history = torch.cat([history, rows.to(device)])[-cfg.action_window:]
    return seen, imagined, torch.cat(executed).numpy(), seconds


def imagination_cost(model, cfg, args):
    """FLOPs and milliseconds of imagining one model step for one candidate plan: in latent space
    (conditioner + predictor), and as pixels, as a model that generates frames must (the same step,
    then the decoder's sampler drawing the frame and the encoder reading it back)."""
    latent = torch.zeros(1, (cfg.image_size // cfg.patch_size) ** 2, cfg.width, device=args.device)
    window = torch.zeros(1, cfg.action_window, len(ACTION_COLUMNS), device=args.device)
    frame = torch.zeros(1, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8, device=args.device)
    in_latents = lambda: model.predict_next(latent, window)
    as_pixels = lambda: model.encoder(iwm.draw_rollout(model, in_latents()[:, None], frame, True, args.euler_steps)[:, 0])
    costs = {}
    with torch.no_grad():
        for name, step in (("latent", in_latents), ("pixels", as_pixels)):
            step()                                                     # warm-up
            costs[name] = {"flops": iwm.count_flops(step), "ms": 1000 * iwm.timed(step, torch.device(args.device), 20)}
    print(f"imagining one step: in latent space {costs['latent']['flops'] / 1e6:.1f} MFLOP, {costs['latent']['ms']:.2f} ms; "
          f"as pixels ({args.euler_steps} Euler steps, then the encoder) {costs['pixels']['flops'] / 1e6:.1f} MFLOP, "
          f"{costs['pixels']['ms']:.2f} ms: {costs['pixels']['flops'] / costs['latent']['flops']:.0f}x the FLOPs, "
          f"{costs['pixels']['ms'] / costs['latent']['ms']:.0f}x the time")
    return costs


def run_planning(model, cfg, args, out):
    """args.trials goals of each kind; the planner and the random policy start from the same world
    with the same goal. Writes GIFs of the first args.n planned trials: goal | agent sees | it imagined."""
    print(f"planning: CEM ({args.plan_iterations} iterations), {GOAL_STEPS + EXTRA_STEPS} model steps per episode, "
          "replanning after every step")
    results, seconds = {"cost_per_imagined_step": imagination_cost(model, cfg, args)}, []
    for kind_index, kind in enumerate(["turning", "walking"]):
        wins = {"plan": 0, "random": 0}
        for trial in tqdm(range(args.trials), desc=f"{kind} goals", unit="trial", leave=False):
            world, goal_frame, goal_state = make_goal(args.goal_seed + 1000 * kind_index + trial, kind, cfg)
            with torch.no_grad():
                goal_latent = model.encode_target(torch.from_numpy(goal_frame)[None, None].to(args.device))[0, 0]
            for policy in wins:
                episode_world = copy.deepcopy(world)
                seen, imagined, rows, plan_seconds = run_episode(model, episode_world, goal_latent, cfg, policy,
                                                                 torch.Generator().manual_seed(args.seed * 100_000 + trial),
                                                                 args.plan_iterations)
                wins[policy] += reached(episode_world.state(), goal_state, kind)
                seconds += plan_seconds
                if policy == "plan" and trial < args.n:    # each imagined step drawn from the frame it started at
                    drawn = to_pixels(iwm.draw_rollout(model, torch.stack(imagined)[:, None],
                                                       torch.from_numpy(np.stack(seen[:-1])).to(args.device), True,
                                                       args.euler_steps, torch.Generator(args.device).manual_seed(args.seed))[:, 0])
                    compose_gif(os.path.join(out, f"plan_{kind}_{trial}.gif"),
                                [np.stack([goal_frame] * len(seen)), np.stack(seen), np.concatenate([seen[:1], drawn])],
                                ["goal", "agent sees", "it imagined"], [np.zeros_like(rows), rows, rows],
                                cfg.frame_skip, args.scale)
        results[kind] = {policy: wins[policy] / args.trials for policy in wins}
        print(f"{kind} goals: planner {wins['plan']}/{args.trials} = {results[kind]['plan']:.0%}, "
              f"random policy {wins['random']}/{args.trials} = {results[kind]['random']:.0%}")
    results.update(goal_seed=args.goal_seed, plan_iterations=args.plan_iterations, trials=args.trials,
                   seconds_per_plan={"mean": float(np.mean(seconds)), "max": float(np.max(seconds))})
    print(f"time per plan: mean {np.mean(seconds):.2f} s, max {np.max(seconds):.2f} s ({len(seconds)} plans, {args.device})")
    return "plan", results


# -----------------------------------------------------------------------------
# Main: load the checkpoint, run one mode, write its results as JSON


# The flags each mode reads beyond --ckpt, --out and --device: any other is refused, not ignored
MODE_FLAGS = {"rollouts": {"data", "video", "horizon", "n", "windows", "euler_steps", "actions", "futures", "scale",
                          "seed"},
              "probe": {"data", "probe_every", "probe_l2", "seed"},
              "surprise": {"trials"},
              "plan": {"trials", "goal_seed", "plan_iterations", "n", "euler_steps", "scale", "seed"}}


def parse_args(argv):
    at_least, text = prepare_data.at_least, prepare_data.non_empty
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--ckpt", type=text, default="runs/iwm/ckpt.pt", help="checkpoint written by iwm.py")
    parser.add_argument("--data", type=text, help="dataset folder (default: the one the checkpoint trained on)")
    parser.add_argument("--video", type=text, help="a raw VPT <stem>.mp4 (with <stem>.jsonl) instead of a dataset")
    parser.add_argument("--out", type=text, help="folder for GIFs and results (default: <ckpt folder>/samples)")
    parser.add_argument("--horizon", type=at_least(1), default=16, help="open-loop model steps per rollout")
    parser.add_argument("--n", type=at_least(0), default=4, help="GIFs to write")
    parser.add_argument("--windows", type=at_least(1), default=64, help="validation windows for the metric table")
    parser.add_argument("--euler_steps", type=at_least(1), help="decoder Euler steps per frame (default: the checkpoint's)")
    parser.add_argument("--actions", help=f"comma-separated scripts to compare: {', '.join(SCRIPTS)}")
    parser.add_argument("--futures", type=at_least(0), default=0,
                        help="GIFs of this many possible futures of the same start and inputs, side by side")
    parser.add_argument("--scale", type=at_least(1), default=3, help="pixel upscaling in the GIFs")
    parser.add_argument("--seed", type=at_least(0, below=prepare_data.SEEDS), default=0,
                        help="which windows, and the decoder's noise")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | mps | auto")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--probe", action="store_true", help="linear probes of yaw, pitch, position vs a random encoder")
    mode.add_argument("--surprise", action="store_true", help="prediction error around a teleport (built-in world)")
    mode.add_argument("--plan", action="store_true", help="goal reaching by planning in the built-in world")
    parser.add_argument("--probe_every", type=at_least(1), default=1, help="--probe: every n-th frame of each episode")
    parser.add_argument("--probe_l2", type=at_least(1e-12, float), default=1e-5, help="--probe: ridge penalty")
    parser.add_argument("--trials", type=at_least(1), default=50, help="--plan: goals of each kind; --surprise: episodes")
    parser.add_argument("--goal_seed", type=at_least(0, below=prepare_data.SEEDS), default=20_000,
                        help="--plan: world seed of the first turning goal (walking goals start 1000 later); "
                             "another value gives goals no setting was tuned on")
    parser.add_argument("--plan_iterations", type=at_least(1), default=4, help="--plan: CEM iterations per plan")
    args = parser.parse_args(argv)
    given = {arg[2:].split("=")[0] for arg in (sys.argv[1:] if argv is None else argv) if arg.startswith("--")}
    chosen = "plan" if args.plan else "surprise" if args.surprise else "probe" if args.probe else "rollouts"
    for flag in sorted(given - MODE_FLAGS[chosen] - {"ckpt", "out", "device", chosen}):
        parser.error(f"argument --{flag}: not used by " + (f"--{chosen}" if chosen != "rollouts" else
                                                            "the rollouts (give --probe, --surprise or --plan)"))
    if args.futures and args.actions:
        parser.error("argument --futures: not used with --actions (give one or the other)")
    if args.video and args.data:
        parser.error("argument --data: not used with --video (the video is the data)")
    if args.video and not prepare_data.jsonl_beside(args.video):
        parser.error(f"argument --video: {args.video}: expected a <stem>.mp4 with its <stem>.jsonl beside it")
    args.actions = [script.strip() for script in args.actions.split(",")] if args.actions else []
    for script in args.actions:
        if script not in SCRIPTS:
            parser.error(f"argument --actions: unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
    return args


def load_model(args):
    """The checkpoint's world model on the chosen device, in eval mode; its state and Config."""
    iwm.check_device(args.device)
    state = iwm.load_checkpoint(args.ckpt)
    cfg = iwm.saved_config(state, **({"data": args.data} if args.data else {}), device=args.device)
    args.device = iwm.choose_hardware(cfg, say=lambda text: None)[0]   # and cfg.dtype, for planning
    model = iwm.WorldModel(cfg)
    iwm.load_model_state(model, state, args.ckpt)
    return state, cfg, model.to(args.device).eval()


def read_video(path, cfg):
    """A raw VPT pair as one episode, converted on the fly by prepare_data's converter."""
    frames, actions, _ = prepare_data.read_episode(path, prepare_data.jsonl_beside(path), cfg.image_size)
    return {"frames": frames, "actions": actions}


def main(argv=None):
    prepare_data.one_line_warnings()
    args = parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "samples")
    try:
        state, cfg, model = load_model(args)
        args.euler_steps = args.euler_steps or cfg.euler_steps
        os.makedirs(out, exist_ok=True)
        print(f"checkpoint {args.ckpt} (step {state['step']}, {cfg.size})")
        if args.plan:
            name, results = run_planning(model, cfg, args, out)
        elif args.surprise:
            name, results = run_surprise(model, cfg, args)
        elif args.video:
            name, results = run_rollouts(model, cfg, [read_video(args.video, cfg)], args, out)
        else:
            if not args.data:
                iwm.require_trained_dataset(cfg, args.ckpt)
            _, train_episodes, val_episodes = iwm.open_dataset(cfg)
            name, results = (run_probes(model, cfg, train_episodes, val_episodes, args) if args.probe
                             else run_rollouts(model, cfg, val_episodes, args, out))
        path = os.path.join(out, f"{name}.json")
        prepare_data.write_json(path, {"checkpoint": args.ckpt, "step": state["step"], **results})   # strict JSON
        print(f"wrote {path}" + (" and the GIFs beside it" if args.n and name in ("metrics", "plan") else ""))
    except (iwm.CheckpointError, ValueError, prepare_data.EpisodeError) as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:
        raise SystemExit(f"error: {prepare_data.describe(e, out)}")
    except KeyboardInterrupt:
        print("interrupted")
        raise SystemExit(130)


if __name__ == "__main__":
    main()
