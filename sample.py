"""
sample.py: watch the world model imagine.

Rollouts run open loop for --horizon model steps from one real frame of a validation episode.
Each rollout becomes a GIF with panels side by side:

    true future | decoded prediction | decoded target latent (reconstruction)

and under every panel the actions that drive it (keys held, a camera arrow, mouse buttons) and
the step number. A per-horizon table compares latent pred/copy and the PSNR of the decoded
prediction with that of simply repeating the start frame; it is printed and saved as JSON.

    python sample.py                                     # latest checkpoint, its validation episodes
    python sample.py --actions turn_left,walk_forward    # "what if": same start, scripted actions
    python sample.py --video EP.mp4                      # a raw VPT episode (EP.jsonl beside it)
"""
import argparse
import contextlib
import json
import os
import time

import cv2
import numpy as np
import torch
from tqdm import tqdm

import iwm
import prepare_data

COLUMN = prepare_data.COLUMN

# Named action scripts for --actions: each gives the action row of frame i of n (20 per second).
# Camera speeds are per frame: 3 degrees per frame turns 60 degrees per second.


def _row(**columns):
    row = np.zeros(len(prepare_data.ACTION_COLUMNS), np.float32)
    for name, value in columns.items():
        row[COLUMN[name]] = value
    return row


SCRIPTS = {
    "stand_still": lambda i, n: _row(),
    "turn_left": lambda i, n: _row(camera_yaw=-3.0),
    "turn_right": lambda i, n: _row(camera_yaw=3.0),
    "look_up": lambda i, n: _row(camera_pitch=-2.0),
    "look_down": lambda i, n: _row(camera_pitch=2.0),
    "walk_forward": lambda i, n: _row(forward=1.0),
    "jump_forward": lambda i, n: _row(forward=1.0, jump=1.0),
    "turn_left_then_forward": lambda i, n: _row(camera_yaw=-3.0) if i < n // 2 else _row(forward=1.0),
}


def script_rows(script, n):
    """The per-frame action rows (n, A) of a script."""
    return np.stack([SCRIPTS[script](i, n) for i in range(n)])


def scripted_window_actions(episode, start, rows, cfg, horizon):
    """Action windows (horizon, K, A) for a rollout from `start` under scripted per-frame rows:
    the recorded history before the start (what really happened), the script from the start on."""
    n = horizon * cfg.frame_skip
    actions = np.array(episode["actions"][:start + n], np.float32)
    actions = np.concatenate([actions, np.zeros((start + n - len(actions), actions.shape[1]), np.float32)])
    actions[start:start + n] = rows
    return np.stack([iwm.action_window(actions, start + (k + 1) * cfg.frame_skip, cfg.action_window)
                     for k in range(horizon)])


# -----------------------------------------------------------------------------
# Drawing: panels, labels, and the actions of each step

LABEL_HEIGHT, BAR_HEIGHT = 16, 30
KEYS_SHOWN = [("forward", "W"), ("left", "A"), ("back", "S"), ("right", "D"), ("jump", "jump"),
              ("sprint", "sprint"), ("sneak", "sneak"), ("attack", "atk"), ("use", "use")]


def draw_actions(bar, step_actions, step, horizon):
    """Fill an info bar with the step number, the keys and buttons held during the step, and
    an arrow for the camera move it made (summed over the step's frames)."""
    font, white, grey = cv2.FONT_HERSHEY_SIMPLEX, (255, 255, 255), (90, 90, 90)
    cv2.putText(bar, f"step {step}/{horizon}", (3, 12), font, 0.35, white, 1, cv2.LINE_AA)
    held = step_actions.max(axis=0) if len(step_actions) else np.zeros(len(COLUMN))
    x, y = 70, 12                         # W A S D after the step number, the rest below
    for name, label in KEYS_SHOWN:
        color = (80, 220, 255) if held[COLUMN[name]] > 0.5 else grey
        cv2.putText(bar, label, (x, y), font, 0.35, color, 1, cv2.LINE_AA)
        x += 7 * len(label) + 5
        if label == "D":
            x, y = 3, 26
    yaw = step_actions[:, COLUMN["camera_yaw"]].sum() if len(step_actions) else 0.0
    pitch = step_actions[:, COLUMN["camera_pitch"]].sum() if len(step_actions) else 0.0
    center = (bar.shape[1] - 14, 15)
    cv2.circle(bar, center, 11, grey, 1)
    length = np.hypot(yaw, pitch)
    if length > 0.1:     # arrow length grows like log(degrees): 1 degree and 90 both show
        reach = 10 * min(np.arcsinh(length / 2) / np.arcsinh(30), 1.0)
        tip = (int(center[0] + reach * yaw / length), int(center[1] + reach * pitch / length))
        cv2.arrowedLine(bar, center, tip, white, 1, cv2.LINE_AA, tipLength=0.4)


def to_pixels(images):
    """(n, 3, H, W) in [-1, 1] -> (n, H, W, 3) uint8 RGB."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def compose_gif(path, panels, labels, panel_actions, frame_skip, scale):
    """panels: list of (H+1, h, w, 3) uint8 RGB; panel_actions: per panel the per-frame actions
    (H * frame_skip, A) that drive it. Writes an animated GIF, one frame per step."""
    frames = []
    horizon = len(panels[0]) - 1
    for step in range(horizon + 1):
        columns = []
        for images, label, actions in zip(panels, labels, panel_actions):
            image = cv2.resize(images[step][:, :, ::-1], None, fx=scale, fy=scale,
                               interpolation=cv2.INTER_NEAREST)
            top = np.zeros((LABEL_HEIGHT, image.shape[1], 3), np.uint8)
            cv2.putText(top, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
            bar = np.zeros((BAR_HEIGHT, image.shape[1], 3), np.uint8)
            step_actions = actions[(step - 1) * frame_skip:step * frame_skip] if step else actions[:0]
            draw_actions(bar, step_actions, step, horizon)
            columns.append(np.concatenate([top, image, bar], axis=0))
            columns.append(np.full((columns[-1].shape[0], 2, 3), 255, np.uint8))   # white gap
        frames.append(np.concatenate(columns[:-1], axis=1))
    animation = cv2.Animation()
    animation.loop_count = 0
    animation.frames = frames
    animation.durations = [400] + [250] * horizon      # milliseconds; the start lingers
    if not cv2.imwriteanimation(path, animation):
        raise OSError(f"OpenCV could not write {path}")


# -----------------------------------------------------------------------------
# Loading the model and the episodes


def load_model(path, device):
    state = iwm.load_checkpoint(path)
    cfg = iwm.Config(**state["config"])
    model = iwm.WorldModel(cfg)
    iwm.load_model_state(model, state, path)
    return model.to(device).eval(), cfg, state["step"]


def episode_from_video(video_path, res):
    """Convert a raw <stem>.mp4 + <stem>.jsonl pair on the fly with prepare_data's converter."""
    jsonl_path = video_path[:-len(".mp4")] + ".jsonl"
    if not video_path.endswith(".mp4") or not os.path.exists(jsonl_path):
        raise SystemExit(f"{video_path}: expected a <stem>.mp4 with its <stem>.jsonl beside it")
    try:
        lines = prepare_data.read_jsonl(jsonl_path)
        actions, _ = prepare_data.actions_from_lines(lines)
        frames = prepare_data.read_frames(video_path, lines, res)
    except prepare_data.EpisodeError as e:
        raise SystemExit(f"error: {e}")
    return {"name": os.path.basename(video_path), "frames": frames, "actions": actions}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="runs/iwm/ckpt.pt", help="checkpoint written by iwm.py")
    parser.add_argument("--data", help="dataset folder (default: the one the checkpoint trained on)")
    parser.add_argument("--video", help="a raw VPT <stem>.mp4 (with <stem>.jsonl) instead of a dataset")
    parser.add_argument("--out", help="folder for GIFs and metrics.json (default: <ckpt folder>/samples)")
    parser.add_argument("--horizon", type=int, default=16, help="open-loop model steps per rollout")
    parser.add_argument("--n", type=int, default=4, help="rollout GIFs to write")
    parser.add_argument("--windows", type=int, default=64, help="validation windows for the metric table")
    parser.add_argument("--sample_steps", type=int, help="decoder Euler steps (default: the checkpoint's)")
    parser.add_argument("--actions", help=f"comma-separated scripts to compare: {', '.join(SCRIPTS)}")
    parser.add_argument("--scale", type=int, default=3, help="pixel upscaling in the GIFs")
    parser.add_argument("--seed", type=int, default=0, help="which windows, and the decoder's noise")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    args = parser.parse_args(argv)
    scripts = args.actions.split(",") if args.actions else []
    for script in scripts:
        if script not in SCRIPTS:
            raise SystemExit(f"--actions {script}: unknown script; choose from {', '.join(SCRIPTS)}")

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, step = load_model(args.ckpt, device)
    except iwm.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    sample_steps = args.sample_steps or cfg.sample_steps
    if args.video:
        episodes = [episode_from_video(args.video, cfg.image_size)]
    else:
        cfg.data = args.data or cfg.data
        try:
            _, _, episodes = iwm.open_dataset(cfg)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "samples")
    os.makedirs(out, exist_ok=True)
    autocast = contextlib.nullcontext()    # sampling runs in full precision
    try:
        sampler = iwm.WindowSampler(episodes, args.horizon, cfg)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    generator = torch.Generator().manual_seed(args.seed)
    print(f"checkpoint {args.ckpt} (step {step}, {cfg.size}); {len(sampler.episodes)} episodes; "
          f"{args.horizon} steps of {cfg.frame_skip} frames; {sample_steps} sampler steps")

    # The metric table, on --windows validation windows
    frames, actions = sampler.sample(args.windows, generator)
    metrics = iwm.evaluate(model, frames, actions, device, autocast, psnr_windows=args.windows,
                           sample_steps=sample_steps)
    columns = ["pred_copy", "psnr_prediction", "psnr_prediction_mean", "psnr_repeat_start", "psnr_reconstruction"]
    table = [{"h": h + 1, **{c: metrics[c][h] for c in columns}} for h in range(args.horizon)]
    print(f"PSNR in dB against the true frame; prediction sample: {sample_steps} Euler steps, prediction mean: 1 step")
    print(" h | latent pred/copy | prediction sample | prediction mean | repeat start | reconstruction")
    for row in table:
        print(f"{row['h']:2d} | {row['pred_copy']:16.3f} | {row['psnr_prediction']:17.2f} | "
              f"{row['psnr_prediction_mean']:15.2f} | {row['psnr_repeat_start']:12.2f} | {row['psnr_reconstruction']:14.2f}")
    print(f"action sensitivity {metrics['action_sensitivity']:.2f}, target std {metrics['target_std']:.3f}")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({"checkpoint": args.ckpt, "step": step, "sample_steps": sample_steps, "windows": args.windows,
                   "action_sensitivity": metrics["action_sensitivity"], "target_std": metrics["target_std"],
                   "per_horizon": table}, f, indent=1)

    # The GIFs
    seconds = []
    positions = sampler.sample_positions(args.n, torch.Generator().manual_seed(args.seed + 1))
    for i, (episode, start) in enumerate(tqdm(positions, desc="rollout GIFs", unit="gif")):
        started = time.perf_counter()
        frames, recorded = (torch.from_numpy(x)[None] for x in sampler.window_at(episode, start))
        n_frames = args.horizon * cfg.frame_skip
        recorded_rows = np.array(episode["actions"][start:start + n_frames])
        noise = torch.Generator(device).manual_seed(args.seed)
        with torch.no_grad():
            f = frames.to(device)
            start_latent = model.encode(f[:, :1])[:, 0]
            truth = to_pixels(iwm.normalize_frames(f[0], cfg.image_size))
            runs = [("predicted", recorded, recorded_rows)]
            for script in scripts:
                rows = script_rows(script, n_frames)
                windows = scripted_window_actions(episode, start, rows, cfg, args.horizon)
                runs.append((script, torch.from_numpy(windows)[None], rows))
            panels, labels, panel_actions = [truth], ["true future"], [recorded_rows]
            for label, window_actions, rows in runs:
                predicted = model.rollout(start_latent, window_actions.to(device))[0]
                drawn = to_pixels(model.decoder.draw(predicted, sample_steps, noise))
                panels.append(np.concatenate([truth[:1], drawn]))
                labels.append(label)
                panel_actions.append(rows)
            if not scripts:
                target = model.encode_target(f)[0, 1:]
                panels.append(np.concatenate([truth[:1], to_pixels(model.decoder.draw(target, sample_steps, noise))]))
                labels.append("reconstruction")
                panel_actions.append(recorded_rows)
        name = f"rollout_{i}" + (f"_{'_'.join(scripts)}" if scripts else "") + ".gif"
        compose_gif(os.path.join(out, name), panels, labels, panel_actions, cfg.frame_skip, args.scale)
        seconds.append(time.perf_counter() - started)
    print(f"wrote {len(positions)} GIFs to {out} ({np.mean(seconds):.1f} s per {args.horizon}-step rollout GIF)")


if __name__ == "__main__":
    main()
