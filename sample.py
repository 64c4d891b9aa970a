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

What the latents are good for, each next to a baseline:

    python sample.py --probe       # linear probes: yaw, pitch, position from pooled latents vs a random encoder
    python sample.py --surprise    # prediction error along episodes with a teleport in the middle
    python sample.py --plan        # reach goal images in the built-in world by CEM planning vs a random policy
"""
import argparse
import contextlib
import copy
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

# -----------------------------------------------------------------------------
# Probes: can a linear map read the player's state (yaw, pitch, position) off the latents?

PROBE_TARGETS = ["sin yaw", "cos yaw", "pitch", "x", "y", "z"]


def probe_data(model, episodes, every):
    """Pooled latents ({pooling: (n, F)}) of every `every`-th frame, and the recorded state there
    as probe targets (n, 6)."""
    features, targets = [], []
    for episode in tqdm(episodes, desc="probe features", unit="episode", leave=False):
        frames = np.arange(0, len(episode["frames"]), every)
        state = np.asarray(episode["state"][frames], np.float64)
        yaw = np.radians(state[:, 0])
        features.append(iwm.pooled_latents(model, np.asarray(episode["frames"][frames])))
        targets.append(np.stack([np.sin(yaw), np.cos(yaw), *state[:, 1:].T], axis=1))
    pooled = {name: torch.cat([f[name] for f in features]) for name in iwm.POOLINGS}
    return pooled, torch.from_numpy(np.concatenate(targets))


def run_probes(model, cfg, train, val, args):
    """Fit ridge probes on training episodes, score R^2 on validation episodes; the same for a
    randomly initialised model as the baseline."""
    train, val = [e for e in train if "state" in e], [e for e in val if "state" in e]
    if not train or not val:
        raise SystemExit(f"error: {cfg.data}: the probe needs recorded state (yaw, pitch, position) "
                         "in both training and validation episodes")
    torch.manual_seed(args.seed)
    baseline = iwm.WorldModel(cfg).to(next(model.parameters()).device).eval()
    scores = {}
    for name, encoder in (("trained", model), ("random init", baseline)):
        train_features, train_targets = probe_data(encoder, train, args.probe_every)
        val_features, val_targets = probe_data(encoder, val, args.probe_every)
        for pooling in iwm.POOLINGS:
            fit = iwm.fit_ridge(train_features[pooling], train_targets, l2=args.probe_l2)
            scores[f"{name}, {pooling}"] = iwm.r_squared(fit(val_features[pooling]), val_targets).tolist()
    frames = "every frame" if args.probe_every == 1 else f"every {args.probe_every}th frame"
    print(f"linear probe R^2 on {len(val)} validation episodes (fit on {len(train)} training episodes, "
          f"{frames}, ridge l2 {args.probe_l2})")
    print(f"{'encoder, pooling':28s}" + "".join(f"{t:>9s}" for t in PROBE_TARGETS))
    for name, values in scores.items():
        print(f"{name:28s}" + "".join(f"{v:9.3f}" for v in values))
    return {name: dict(zip(PROBE_TARGETS, values)) for name, values in scores.items()}


# -----------------------------------------------------------------------------
# Surprise: the prediction error along an episode spikes when the world jumps


def teleport_episode(seed, steps, teleport_step, cfg):
    """The scripted player in the built-in world for `steps` model steps; just after the frame
    of step teleport_step it is moved half the world away. Returns frames (steps + 1, H, W, 3)
    and action windows (steps, K, A), built by the same converter as the dataset."""
    world, player = prepare_data.World(seed), prepare_data.ScriptedPlayer(seed)
    frames, lines, previous = [], [], prepare_data.PlayerInput()
    for tick in range(steps * cfg.frame_skip + 1):
        if tick % cfg.frame_skip == 0:
            frames.append(prepare_data.dataset_frame(world.frame(), cfg.image_size))
        if tick == teleport_step * cfg.frame_skip + 1:
            world.pos[[0, 2]] = (world.pos[[0, 2]] + prepare_data.WORLD_SIZE / 2) % prepare_data.WORLD_SIZE
            world.pos[1] = world.ground_at(world.pos[0], world.pos[2])
        inp = player.act(world)
        lines.append(world.line(tick, inp, previous))
        world.step(inp)
        previous = inp
    rows, _ = prepare_data.actions_from_lines(lines)
    windows = np.stack([iwm.action_window(rows, (k + 1) * cfg.frame_skip, cfg.action_window) for k in range(steps)])
    return torch.from_numpy(np.stack(frames)), torch.from_numpy(windows)


def run_surprise(model, cfg, args, steps=40, teleport_step=20):
    """Teleport the player mid-episode in args.trials episodes; compare the prediction error of
    the teleport step with the median error of the other steps of the same episode."""
    device = next(model.parameters()).device
    ratios, largest = [], 0
    for trial in tqdm(range(args.trials), desc="surprise episodes", unit="episode", leave=False):
        frames, windows = teleport_episode(10_000 + trial, steps, teleport_step, cfg)
        errors = iwm.surprise(model, frames.to(device), windows.to(device)).cpu().numpy()
        ratios.append(errors[teleport_step] / np.median(np.delete(errors, teleport_step)))
        largest += int(errors.argmax() == teleport_step)
        if trial == 0:
            tqdm.write(f"prediction error (x1000) per step of episode 1, teleported between frames "
                       f"{teleport_step} and {teleport_step + 1}:\n  " + " ".join(f"{1000 * e:.0f}" for e in errors))
    print(f"surprise over {args.trials} teleport episodes: the teleport step's error is {np.median(ratios):.1f}x "
          f"the median step's (median over episodes; lowest {np.min(ratios):.1f}x, highest {np.max(ratios):.0f}x); "
          f"it is the episode's largest error in {largest} of {args.trials}")
    return {"teleport_over_median_step": float(np.median(ratios)), "lowest": float(np.min(ratios)),
            "teleport_step_largest": largest}


# -----------------------------------------------------------------------------
# Planning: reach a goal image in the built-in world by model-predictive control with CEM

GOAL_STEPS = 4            # model steps of the hidden action sequence that makes a goal
EXTRA_STEPS = 2           # the agent gets a little more time than the hidden sequence took
REPLAN_EVERY = 1          # model steps executed before planning again (1: replan after every step)


def make_goal(seed, kind, cfg):
    """A start (the world) and a goal: what the player sees after a hidden sequence of turning
    (30-80 degrees of yaw, up to 20 of pitch) or walking (GOAL_STEPS steps forward: 3.5 blocks at
    frame_skip 4, with up to 30 degrees of turn; redrawn if a tree or cliff blocks the walk)
    from the start. Returns (world, goal frame, goal state)."""
    rng = np.random.default_rng(seed)
    world = prepare_data.World(seed)
    world.pitch = float(rng.uniform(-15, 25))
    for attempt in range(100):
        if kind == "turning":
            yaw, pitch, forward = rng.choice([-1, 1]) * rng.uniform(30, 80), rng.uniform(-20, 20), 0.0
        else:
            yaw, pitch, forward = rng.uniform(-30, 30), rng.uniform(-5, 5), 1.0
        ticks = GOAL_STEPS * cfg.frame_skip
        controls = torch.tensor([[yaw / ticks, pitch / ticks, forward]] * GOAL_STEPS)
        goal_world = copy.deepcopy(world)
        for row in iwm.controls_to_rows(controls, cfg.frame_skip).numpy():
            goal_world.step(prepare_data.input_from_action(row))
        moved = np.linalg.norm(goal_world.pos - world.pos)
        if kind == "turning" or moved > 0.7 * prepare_data.WALK * ticks:   # a blocked walk is no walk
            return world, prepare_data.dataset_frame(goal_world.frame(), cfg.image_size), goal_world.state()
        world.yaw = float(rng.uniform(-180, 180))
    raise RuntimeError(f"world {seed}: no direction to walk in from the start")


def reached(state, goal, kind):
    """Success: camera within 15 degrees of the goal's yaw and pitch, and for walking goals
    within 1.5 blocks of the goal position."""
    yaw_error = abs((state[0] - goal[0] + 180) % 360 - 180)
    close = yaw_error <= 15 and abs(state[1] - goal[1]) <= 15
    return close and (kind == "turning" or np.linalg.norm(state[2:] - goal[2:]) <= 1.5)


def run_episode(model, world, goal_latent, cfg, policy, generator, autocast, iterations):
    """Model-predictive control: plan, execute REPLAN_EVERY steps, see, plan again, until the
    budget is spent. policy "plan" uses CEM; "random" draws controls uniformly from the same box.
    Returns the frames seen, the latents imagined for each step, the executed rows, plan times."""
    device = next(model.parameters()).device
    steps = GOAL_STEPS + EXTRA_STEPS
    history = torch.zeros(cfg.action_window, len(prepare_data.ACTION_COLUMNS), device=device)   # standing still
    seen, imagined, executed, seconds = [prepare_data.dataset_frame(world.frame(), cfg.image_size)], [], [], []
    controls = None
    for step in range(0, steps, REPLAN_EVERY):
        horizon = steps - step                     # plan to the end of the budget, execute the start
        if policy == "random":
            controls = random_controls(horizon, generator)
        else:
            with torch.no_grad(), autocast:
                latent = model.encode(torch.from_numpy(seen[-1])[None, None].to(device))[0, 0]
                started = time.perf_counter()
                init = None if controls is None else controls[REPLAN_EVERY:]
                controls, _ = iwm.plan(model, latent, goal_latent, history, horizon, init, generator,
                                       iterations=iterations)
                seconds.append(time.perf_counter() - started)
                rows = iwm.controls_to_rows(controls, cfg.frame_skip)
                imagined.extend(iwm.imagine(model, latent, history, rows[None])[0, :REPLAN_EVERY].float())
        rows = iwm.controls_to_rows(controls[:REPLAN_EVERY], cfg.frame_skip)
        for k, row in enumerate(rows.numpy()):
            world.step(prepare_data.input_from_action(row))
            if (k + 1) % cfg.frame_skip == 0:
                seen.append(prepare_data.dataset_frame(world.frame(), cfg.image_size))
        executed.append(rows)
        history = torch.cat([history, rows.to(device)])[-cfg.action_window:]
    return seen, imagined, torch.cat(executed).numpy(), seconds


def random_controls(horizon, generator):
    """The random policy: controls drawn uniformly from the planner's box, per model step."""
    return iwm.PLAN_LOW + (iwm.PLAN_HIGH - iwm.PLAN_LOW) * torch.rand(horizon, len(iwm.PLAN_CONTROLS),
                                                                       generator=generator)


def run_planning(model, cfg, args, out, sample_steps):
    """args.trials goals of each kind; the planner and the random policy start from the same
    world with the same goal. Prints success rates and time per plan; writes GIFs of the first
    args.n trials of each kind: goal | what the agent sees | what it imagined."""
    device = next(model.parameters()).device
    dtype, reason = iwm.choose_dtype(iwm.Config(dtype=args.plan_dtype), device.type)
    autocast = iwm.autocast_to(device.type, dtype)
    print(f"planning: CEM ({args.plan_iterations} iterations), {GOAL_STEPS + EXTRA_STEPS} model steps per episode, "
          f"replanning every {REPLAN_EVERY}; precision {dtype} ({reason})")
    results, seconds = {}, []
    for kind_index, kind in enumerate(["turning", "walking"]):
        wins = {"plan": 0, "random": 0}
        for trial in tqdm(range(args.trials), desc=f"{kind} goals", unit="trial", leave=False):
            world, goal_frame, goal_state = make_goal(args.goal_seed + 1000 * kind_index + trial, kind, cfg)
            with torch.no_grad():
                goal_latent = model.encode_target(torch.from_numpy(goal_frame)[None, None].to(device))[0, 0]
            for policy in wins:
                generator = torch.Generator().manual_seed(args.seed * 100_000 + trial)
                episode_world = copy.deepcopy(world)
                seen, imagined, rows, plan_seconds = run_episode(model, episode_world, goal_latent, cfg, policy,
                                                                 generator, autocast, args.plan_iterations)
                wins[policy] += reached(episode_world.state(), goal_state, kind)
                seconds += plan_seconds
                if policy == "plan" and trial < args.n:
                    noise = torch.Generator(device).manual_seed(args.seed)
                    with torch.no_grad():
                        drawn = to_pixels(model.decoder.draw(torch.stack(imagined), sample_steps, noise))
                    panels = [np.stack([goal_frame] * len(seen)), np.stack(seen), np.concatenate([seen[:1], drawn])]
                    compose_gif(os.path.join(out, f"plan_{kind}_{trial}.gif"), panels,
                                ["goal", "agent sees", "it imagined"],
                                [np.zeros_like(rows), rows, rows], cfg.frame_skip, args.scale)
        results[kind] = {policy: wins[policy] / args.trials for policy in wins}
        print(f"{kind} goals: planner {wins['plan']}/{args.trials} = {results[kind]['plan']:.0%}, "
              f"random policy {wins['random']}/{args.trials} = {results[kind]['random']:.0%}")
    results["goal_seed"], results["plan_iterations"] = args.goal_seed, args.plan_iterations
    results["seconds_per_plan"] = {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))}
    print(f"time per plan: mean {np.mean(seconds):.2f} s, max {np.max(seconds):.2f} s ({len(seconds)} plans, {device})")
    return results


def write_results(out, name, args, step, **results):
    """out/<name>.json: which checkpoint and step, then the results; written atomically."""
    path = os.path.join(out, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"checkpoint": args.ckpt, "step": step, **results}, f, indent=1)
    os.replace(path + ".tmp", path)


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
    parser.add_argument("--probe", action="store_true", help="linear probes of yaw, pitch, position vs a random encoder")
    parser.add_argument("--probe_every", type=int, default=1, help="probe every n-th frame of each episode")
    parser.add_argument("--probe_l2", type=float, default=1e-5, help="ridge penalty of the probe")
    parser.add_argument("--surprise", action="store_true", help="prediction error around a teleport (built-in world)")
    parser.add_argument("--plan", action="store_true", help="goal reaching by planning in the built-in world")
    parser.add_argument("--trials", type=int, default=50, help="--plan: goals of each kind; --surprise: episodes")
    parser.add_argument("--goal_seed", type=int, default=20_000,
                        help="--plan: world seed of the first turning goal (walking goals start 1000 later); "
                             "another value gives goals no setting was tuned on")
    parser.add_argument("--plan_iterations", type=int, default=4, help="--plan: CEM iterations per plan")
    parser.add_argument("--plan_dtype", default="auto", help="--plan: float32 | bfloat16 | auto (as iwm.py chooses)")
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
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "samples")
    os.makedirs(out, exist_ok=True)
    if args.plan or args.surprise:      # these run in the built-in world, no dataset needed
        print(f"checkpoint {args.ckpt} (step {step}, {cfg.size})")
        if args.plan:
            name, results = "plan", run_planning(model, cfg, args, out, sample_steps)
        else:
            name, results = "surprise", run_surprise(model, cfg, args)
        write_results(out, name, args, step, trials=args.trials, **results)
        return
    if args.video:
        episodes = [episode_from_video(args.video, cfg.image_size)]
    else:
        cfg.data = args.data or cfg.data
        try:
            _, train_episodes, episodes = iwm.open_dataset(cfg)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        if args.probe:
            scores = run_probes(model, cfg, train_episodes, episodes, args)
            write_results(out, "probe", args, step, r_squared=scores)
            return
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
    write_results(out, "metrics", args, step, sample_steps=sample_steps, windows=args.windows,
                  action_sensitivity=metrics["action_sensitivity"], target_std=metrics["target_std"],
                  per_horizon=table)

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
