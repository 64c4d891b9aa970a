"""
prepare_data.py: turn Minecraft-style video into a training-ready dataset for iwm.py.

Three sources, one converter (so the built-in world is read exactly like real data):

    python prepare_data.py --synthetic 48                # built-in world: render, record, convert
    python prepare_data.py --vpt DIR                     # folder of real VPT <stem>.mp4 + <stem>.jsonl
    python prepare_data.py --download all_6xx_Jun_29.json --n 10   # fetch VPT episodes, then convert

Every mode takes --out DIR (the dataset folder) and --res R (64, 128 or 224).

What a dataset folder holds:

    <out>/index.json                  action/state column names, fps, resolution, source, split
    <out>/episodes/<stem>/frames.npy  (T, R, R, 3) uint8 RGB, frame i of the video
    <out>/episodes/<stem>/actions.npy (T, A) float32, the action taken while frame i was shown
    <out>/episodes/<stem>/state.npy   (T, 5) float32 yaw, pitch, x, y, z before action i (if recorded)
    <out>/raw/                        the <stem>.mp4 + <stem>.jsonl pairs (synthetic and downloaded)

Facts about the VPT format come from ../shared/docs/vpt-format.md; each rule below cites it.
Sections: action conversion -> reading episodes -> the dataset -> the built-in world ->
the scripted player -> downloading -> main.
"""
import argparse
import hashlib
import ipaddress
import json
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from multiprocessing import Pool

import cv2
import numpy as np
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Action conversion: one jsonl line -> one row of float32 action columns

FPS = 20                       # VPT records at 20 frames per second
VIDEO_SIZE = (640, 360)        # VPT video width, height
WINDOW_HEIGHT = 720            # mouse x, y are recorded in the 1280x720 game window
CAMERA_DEGREES_PER_UNIT = 0.15 # 2400 mouse units turn the view 360 degrees

# Held keys -> MineRL action names (vpt-format.md). Any other key is ignored.
KEY_TO_ACTION = {
    "key.keyboard.escape": "ESC", "key.keyboard.w": "forward", "key.keyboard.s": "back",
    "key.keyboard.a": "left", "key.keyboard.d": "right", "key.keyboard.space": "jump",
    "key.keyboard.left.shift": "sneak", "key.keyboard.left.control": "sprint",
    "key.keyboard.q": "drop", "key.keyboard.e": "inventory", "key.keyboard.f": "swapHands",
    **{f"key.keyboard.{n}": f"hotbar.{n}" for n in range(1, 10)},
}
# Mouse buttons as VPT numbers them; the original code read 1,2,3 and so dropped attack.
BUTTON_TO_ACTION = {0: "attack", 1: "use", 2: "pickItem"}
ACTION_COLUMNS = (list(KEY_TO_ACTION.values()) + list(BUTTON_TO_ACTION.values())
                  + ["camera_pitch", "camera_yaw", "gui_open"])
COLUMN = {name: i for i, name in enumerate(ACTION_COLUMNS)}
STATE_COLUMNS = ["yaw", "pitch", "xpos", "ypos", "zpos"]


class EpisodeError(Exception):
    """A problem with one episode's files: the episode is skipped, the others go on."""


def actions_from_lines(lines):
    """Convert parsed jsonl lines to (actions (N, A) float32, state (N, 5) float32 or None).

    Row i is the action taken while frame i was shown (its effect shows in frame i+1).
    """
    actions = np.zeros((len(lines), len(ACTION_COLUMNS)), np.float32)
    # "Attack stuck" quirk: a recording that starts with newButtons == [0] has attack held
    # by the recorder, not the player, until the player really presses it again.
    first_mouse = (lines[0].get("mouse") or {}) if lines else {}
    attack_stuck = first_mouse.get("newButtons") == [0]
    for i, line in enumerate(lines):
        mouse = line.get("mouse") or {}          # null mouse or keyboard means "no input"
        keyboard = line.get("keyboard") or {}
        if i > 0 and attack_stuck and 0 in (mouse.get("newButtons") or []):
            attack_stuck = False
        for key in keyboard.get("keys") or []:
            if key in KEY_TO_ACTION:
                actions[i, COLUMN[KEY_TO_ACTION[key]]] = 1
        for button in mouse.get("buttons") or []:
            if button in BUTTON_TO_ACTION and not (button == 0 and attack_stuck):
                actions[i, COLUMN[BUTTON_TO_ACTION[button]]] = 1
        # Floats on purpose: OpenAI's loader stored these in an int array and lost every
        # move under one degree (their issue #54).
        actions[i, COLUMN["camera_pitch"]] = (mouse.get("dy") or 0) * CAMERA_DEGREES_PER_UNIT
        actions[i, COLUMN["camera_yaw"]] = (mouse.get("dx") or 0) * CAMERA_DEGREES_PER_UNIT
        actions[i, COLUMN["gui_open"]] = float(bool(line.get("isGuiOpen")))
    # Scroll-wheel hotbar changes are visible only as a change of `hotbar` between lines.
    # MineRL's causal convention: action i caused the state on line i+1, so the key goes on i.
    for i in range(len(lines) - 1):
        now, after = lines[i].get("hotbar"), lines[i + 1].get("hotbar")
        if now is not None and after is not None and now != after and 0 <= after <= 8:
            actions[i, COLUMN[f"hotbar.{after + 1}"]] = 1
    has_state = all(all(line.get(k) is not None for k in STATE_COLUMNS) for line in lines)
    state = (np.array([[line[k] for k in STATE_COLUMNS] for line in lines], np.float32)
             if has_state and lines else None)
    return actions, state


# -----------------------------------------------------------------------------
# Reading one episode: jsonl lines, then frames paired with them

def read_jsonl(path):
    """Parse a VPT action file: one JSON object per line. Errors name the file and line."""
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as e:
                raise EpisodeError(f"{path}: line {number} is not valid JSON ({e.msg}); "
                                   "the file is corrupt or truncated") from None
            if not isinstance(line, dict):
                raise EpisodeError(f"{path}: line {number} is not a JSON object")
            lines.append(line)
    if not lines:
        raise EpisodeError(f"{path}: no action lines")
    return lines


def draw_cursor(frame_bgr, x, y):
    """Draw a 16x16 arrow cursor at window position (x, y). VPT videos have no OS cursor, so
    with a GUI open the player saw one we must add (as OpenAI's loader does, with an image)."""
    scale = VIDEO_SIZE[1] / WINDOW_HEIGHT
    tip = np.array([x * scale, y * scale])
    arrow = np.array([[0, 0], [0, 14], [4, 10], [7, 16], [9, 15], [6, 9], [11, 9]], np.float64)
    points = np.round(tip + arrow).astype(np.int32)
    cv2.fillPoly(frame_bgr, [points], (255, 255, 255))
    cv2.polylines(frame_bgr, [points], True, (0, 0, 0), 1)


def dataset_frame(frame_bgr, res):
    """A video frame as the dataset stores it: squashed to res x res, RGB. INTER_AREA averages
    the pixels a target pixel covers; INTER_LINEAR (OpenAI's choice for 128) aliases badly when
    shrinking 640 wide to 64."""
    return np.ascontiguousarray(cv2.resize(frame_bgr, (res, res), interpolation=cv2.INTER_AREA)[:, :, ::-1])


def read_frames(video_path, lines, res):
    """Decode the video, draw the cursor on GUI-open frames, squash to res x res RGB.

    A video has N or N+1 frames for N lines (the recorder writes the last frame twice);
    anything else is a broken episode. Frames are counted by decoding, not by metadata.
    """
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise EpisodeError(f"{video_path}: OpenCV cannot open this video")
    width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
    fps = capture.get(cv2.CAP_PROP_FPS)
    if (int(width), int(height)) != VIDEO_SIZE:
        raise EpisodeError(f"{video_path}: resolution {int(width)}x{int(height)}, "
                           f"expected {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}")
    if abs(fps - FPS) > 0.5:
        raise EpisodeError(f"{video_path}: {fps:g} fps, expected {FPS}")
    frames = np.empty((len(lines), res, res, 3), np.uint8)
    count = 0
    while count <= len(lines) + 1:           # read one past N+1 to detect too many frames
        ok, frame = capture.read()
        if not ok:
            break
        if count < len(lines):
            line = lines[count]
            if line.get("isGuiOpen") and (line.get("mouse") or {}).get("x") is not None:
                draw_cursor(frame, line["mouse"]["x"], line["mouse"]["y"])
            frames[count] = dataset_frame(frame, res)
        count += 1
    capture.release()
    if count not in (len(lines), len(lines) + 1):
        got = f"{count}" if count <= len(lines) + 1 else f"more than {len(lines) + 1}"
        raise EpisodeError(f"{video_path}: {got} frames for {len(lines)} action lines "
                           f"(expected {len(lines)} or {len(lines) + 1})")
    return frames


# -----------------------------------------------------------------------------
# The dataset: one folder, one subfolder per finished episode, an index with the split

def split_of(stem, val_fraction):
    """Deterministic train/val split by episode. Chunks of one recording session share the
    alias and session id (<alias>-<12 hex id>-<date>-<time>), so they go to the same side:
    otherwise consecutive minutes of one session would sit in both train and val."""
    parts = stem.rsplit("-", 2)
    session = parts[0] if len(parts) == 3 else stem
    h = int.from_bytes(hashlib.sha1(session.encode()).digest()[:8], "big") / 2 ** 64
    return "val" if h < val_fraction else "train"


def convert_episode(video_path, jsonl_path, out_dir, res):
    """Convert one raw episode into <out_dir>/episodes/<stem>/. Returns its meta dict.

    Written to a temporary folder and renamed at the end, so a killed run never leaves a
    half-written episode that loads; a finished episode is skipped on rerun.
    """
    stem = os.path.basename(video_path)[:-len(".mp4")]
    final = os.path.join(out_dir, "episodes", stem)
    if os.path.exists(os.path.join(final, "meta.json")):
        with open(os.path.join(final, "meta.json")) as f:
            return json.load(f)
    lines = read_jsonl(jsonl_path)
    actions, state = actions_from_lines(lines)
    frames = read_frames(video_path, lines, res)
    tmp = os.path.join(out_dir, "episodes", f".tmp-{stem}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "frames.npy"), frames)
    np.save(os.path.join(tmp, "actions.npy"), actions)
    if state is not None:
        np.save(os.path.join(tmp, "state.npy"), state)
    meta = {"name": stem, "frames": len(frames), "has_state": state is not None,
            "null_actions": int((actions[:, :-1] == 0).all(axis=1).sum())}
    with open(os.path.join(tmp, "meta.json"), "w") as f:   # meta.json last: it marks "done"
        json.dump(meta, f)
    shutil.rmtree(final, ignore_errors=True)               # a stale folder without meta.json
    os.rename(tmp, final)
    return meta


def _convert_job(job):
    """Pool worker: convert one episode, turning any failure into a message (never raises)."""
    video_path, jsonl_path, out_dir, res = job
    try:
        return convert_episode(video_path, jsonl_path, out_dir, res), None
    except EpisodeError as e:
        return None, str(e)
    except Exception as e:  # an unexpected bug or I/O error must not stop the other episodes
        return None, f"{video_path}: {type(e).__name__}: {e}"


def find_episodes(raw_dir):
    """Pairs (mp4, jsonl) in a folder; an mp4 without its jsonl is reported, not converted."""
    pairs, problems = [], []
    for name in sorted(os.listdir(raw_dir)):
        if name.endswith(".mp4"):
            video = os.path.join(raw_dir, name)
            jsonl = video[:-len(".mp4")] + ".jsonl"
            if os.path.exists(jsonl):
                pairs.append((video, jsonl))
            else:
                problems.append(f"{video}: no matching {os.path.basename(jsonl)}")
    return pairs, problems


def convert_folder(raw_dir, out_dir, res, source, workers=2, val_fraction=0.1):
    """Convert every episode pair in raw_dir (one episode per process), then write the index."""
    pairs, problems = find_episodes(raw_dir)
    os.makedirs(os.path.join(out_dir, "episodes"), exist_ok=True)
    check_resolution(out_dir, res)
    jobs = [(video, jsonl, out_dir, res) for video, jsonl in pairs]
    converted = 0
    with Pool(workers) as pool:
        for meta, problem in tqdm(pool.imap_unordered(_convert_job, jobs), total=len(jobs),
                                  desc="convert", unit="episode"):
            if problem:
                problems.append(problem)
                tqdm.write(f"skipped: {problem}")
            else:
                converted += 1
    write_index(out_dir, res, source, val_fraction)
    print(f"converted {converted} episodes, skipped {len(problems)}")
    for problem in problems:
        print(f"  skipped: {problem}")
    return converted, problems


def check_resolution(out_dir, res):
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            old = json.load(f)["resolution"]
        if old != res:
            sys.exit(f"{out_dir} already holds a {old}x{old} dataset; use another --out "
                     f"for --res {res}")


def write_index(out_dir, res, source, val_fraction):
    """Rebuild index.json from the finished episodes (written atomically)."""
    episodes_dir = os.path.join(out_dir, "episodes")
    episodes = []
    for stem in sorted(os.listdir(episodes_dir)):
        meta_path = os.path.join(episodes_dir, stem, "meta.json")
        if not stem.startswith(".") and os.path.exists(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            episodes.append({**meta, "split": split_of(stem, val_fraction)})
    # A tiny dataset may hash no session to val: then the lowest-hash session goes there,
    # still deterministic and still by episode.
    if episodes and all(e["split"] == "train" for e in episodes) and len(episodes) > 1:
        first = min(episodes, key=lambda e: hashlib.sha1(e["name"].encode()).hexdigest())
        first["split"] = "val"
    index = {"format": 1, "source": source, "fps": FPS, "resolution": res,
             "action_columns": ACTION_COLUMNS, "state_columns": STATE_COLUMNS,
             "val_fraction": val_fraction, "episodes": episodes}
    tmp = os.path.join(out_dir, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "index.json"))


def load_dataset(data_dir):
    """Open a prepared dataset: (index, list of per-episode dicts of memory-mapped arrays).
    Nothing is read into RAM until it is indexed."""
    index_path = os.path.join(data_dir, "index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{index_path} not found: prepare a dataset first, e.g. "
                                "`python prepare_data.py --synthetic 64`")
    with open(index_path) as f:
        index = json.load(f)
    episodes = []
    for meta in index["episodes"]:
        folder = os.path.join(data_dir, "episodes", meta["name"])
        episode = {**meta,
                   "frames": np.load(os.path.join(folder, "frames.npy"), mmap_mode="r"),
                   "actions": np.load(os.path.join(folder, "actions.npy"), mmap_mode="r")}
        if meta["has_state"]:
            episode["state"] = np.load(os.path.join(folder, "state.npy"), mmap_mode="r")
        episodes.append(episode)
    return index, episodes


# -----------------------------------------------------------------------------
# The built-in world: blocky terrain, sky and HUD that look and play enough like Minecraft
# for a world model to have something real to learn. Coordinates follow Minecraft: y is up,
# yaw 0 faces +z and grows turning right, pitch +90 looks straight down.

WORLD_SIZE = 128          # the terrain is a 128x128 torus: walking off one edge enters the other
SEA_LEVEL = 10            # columns below this are filled with water up to it
MAX_HEIGHT = 40           # no block is higher; a ray climbing above this sees only sky
VIEW_DISTANCE = 36.0      # blocks; the fog hides where rays stop
FOG_START = 12.0          # blocks; fog thickens linearly from here to VIEW_DISTANCE
HAZE = 0.25               # even near blocks are seen through this much haze
FOV_Y = math.radians(70)  # Minecraft's default vertical field of view
EYE_HEIGHT = 1.62         # blocks above the feet, as in Minecraft
RENDER_SIZE = (96, 54)    # internal render (w, h), 16:9, upscaled to 640x360: rendering is
                          # the slow part and the converter squashes frames to 64x64 anyway
REACH = 4.5               # blocks: how far away the player can break a block
BREAK_TICKS = 6           # ticks of holding attack to break one block
SUN_DIRECTION = np.array([0.55, 0.5, 0.67]) / np.linalg.norm([0.55, 0.5, 0.67])

# Walking speeds in blocks per tick (Minecraft: 4.317, 5.612 sprinting, 1.295 sneaking, per s)
WALK, SPRINT, SNEAK = 4.317 / FPS, 5.612 / FPS, 1.295 / FPS
JUMP_VELOCITY, GRAVITY, AIR_DRAG = 0.42, 0.08, 0.98   # Minecraft's per-tick physics

GRASS, DIRT, STONE, SAND, WATER, LOG, LEAVES, SNOW = range(8)
BLOCK_RGB = np.array([[95, 159, 53], [134, 96, 67], [125, 125, 125], [219, 207, 163],
                      [52, 88, 210], [102, 81, 51], [58, 120, 38], [240, 245, 250]],
                     np.float32) / 255
# Minecraft shades faces by their direction: top, bottom, then sides. Our sides are lit by the
# sun (brightest facing it), so which sides a view shows tells the compass direction.
FACE_SHADE = np.array([1.0, 0.5], np.float32)
SUN_AZIMUTH = math.atan2(SUN_DIRECTION[0], SUN_DIRECTION[2])   # radians; yaw 0 faces +z
HOTBAR_ITEM_RGB = [(200, 60, 60), (60, 160, 60), (70, 90, 200), (220, 200, 60), (160, 80, 200),
                   (60, 190, 190), (230, 130, 40), (240, 240, 240), (110, 70, 40)]


def periodic_noise(rng, size, smoothness):
    """Smooth random field that tiles (so the torus has no seam): white noise filtered by
    1/f^smoothness in Fourier space, scaled to zero mean and unit std."""
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / radius ** smoothness
    spectrum[0, 0] = 0.0
    field = np.fft.ifft2(spectrum).real
    return (field - field.mean()) / field.std()


def hash_noise(*coords):
    """Deterministic pseudo-random value in [0, 1) per integer coordinate tuple (texture grain)."""
    h = np.uint32(2166136261)
    for c in coords:
        h = (h ^ np.asarray(c, np.int64).astype(np.uint32)) * np.uint32(16777619)
        h ^= h >> np.uint32(13)
    return (h & np.uint32(0xFFFF)).astype(np.float32) / 65536


@dataclass
class PlayerInput:
    """What the player does during one tick, in the terms the VPT recorder writes."""
    keys: set = field(default_factory=set)   # held keys, e.g. {"key.keyboard.w"}
    dx: int = 0                              # mouse movement, window pixels (+ right)
    dy: int = 0                              # (+ down)
    buttons: set = field(default_factory=set)  # held mouse buttons: 0 attack, 1 use, 2 pickItem
    dwheel: int = 0                          # scroll wheel clicks (+ up: hotbar slot - 1)


def input_from_action(action):
    """Invert the converter for one action row (ACTION_COLUMNS), e.g. to execute a plan."""
    keys = {key for key, name in KEY_TO_ACTION.items() if action[COLUMN[name]] > 0.5}
    buttons = {b for b, name in BUTTON_TO_ACTION.items() if action[COLUMN[name]] > 0.5}
    return PlayerInput(keys=keys, buttons=buttons,
                       dx=int(round(action[COLUMN["camera_yaw"]] / CAMERA_DEGREES_PER_UNIT)),
                       dy=int(round(action[COLUMN["camera_pitch"]] / CAMERA_DEGREES_PER_UNIT)))


class World:
    """The closed-loop API: World(seed) builds terrain; step(input) advances one tick (1/20 s);
    frame() renders what the player sees (640x360 BGR, like a VPT video frame); state() gives
    yaw, pitch, x, y, z; line(tick, input) is the jsonl line a VPT recorder would write."""

    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        n = WORLD_SIZE
        hills = periodic_noise(rng, n, 2.4) * 3.0 + periodic_noise(rng, n, 1.5) * 1.2
        mountains = np.maximum(periodic_noise(rng, n, 2.6), 0) ** 2 * 4
        ground = np.clip(np.round(SEA_LEVEL + 1 + hills + mountains), 2, MAX_HEIGHT - 10)
        self.height = ground.astype(np.int32)
        self.top = np.full((n, n), GRASS, np.int32)
        self.top[self.height <= SEA_LEVEL + 1] = SAND
        self.top[self.height >= SEA_LEVEL + 13] = STONE
        self.top[self.height >= SEA_LEVEL + 17] = SNOW
        water = self.height < SEA_LEVEL
        self.height[water], self.top[water] = SEA_LEVEL, WATER
        self.log_from = np.full((n, n), MAX_HEIGHT, np.int32)  # y where a tree trunk starts
        self.leaf_low = np.zeros((n, n), np.int32)             # leaves fill [low, high)
        self.leaf_high = np.zeros((n, n), np.int32)
        for _ in range(int(n * n * 0.012)):
            x, z = rng.integers(2, n - 2, size=2)
            if self.top[x, z] == GRASS and self.leaf_high[x - 2:x + 3, z - 2:z + 3].max() == 0:
                base, trunk = self.height[x, z], int(rng.integers(4, 6))
                self.leaf_low[x - 1:x + 2, z - 1:z + 2] = base + trunk - 2
                self.leaf_high[x - 1:x + 2, z - 1:z + 2] = base + trunk + 1
                self.log_from[x, z], self.height[x, z] = base, base + trunk
                self.leaf_low[x, z] = base + trunk
        # Start on dry land, facing a random direction
        dry = np.argwhere((self.top == GRASS) & (self.leaf_high == 0))
        x, z = dry[rng.integers(len(dry))]
        self.pos = np.array([x + 0.5, float(self.height[x, z]), z + 0.5])
        self.yaw, self.pitch = float(rng.uniform(-180, 180)), 0.0
        self.vy, self.on_ground, self.hotbar = 0.0, True, 0
        self.breaking, self.break_target = 0, None

    # --- physics ----------------------------------------------------------------
    def ground_at(self, x, z):
        return float(self.height[int(math.floor(x)) % WORLD_SIZE, int(math.floor(z)) % WORLD_SIZE])

    def leaves_block(self, x, z):
        """Leaves are solid: they stop a player whose body (1.8 blocks tall) would touch them."""
        x, z = int(math.floor(x)) % WORLD_SIZE, int(math.floor(z)) % WORLD_SIZE
        low, high = self.leaf_low[x, z], self.leaf_high[x, z]
        return high > low and low < self.pos[1] + 1.8 and high > self.pos[1]

    def step(self, inp):
        """Advance one tick with this input (the state afterwards is that of the next line)."""
        held = {key.removeprefix("key.keyboard.") for key in inp.keys}
        self.yaw += inp.dx * CAMERA_DEGREES_PER_UNIT
        self.pitch = float(np.clip(self.pitch + inp.dy * CAMERA_DEGREES_PER_UNIT, -90, 90))
        for n in range(1, 10):
            if str(n) in held:
                self.hotbar = n - 1
        self.hotbar = (self.hotbar - int(np.sign(inp.dwheel))) % 9
        forward = ("w" in held) - ("s" in held)
        right = ("d" in held) - ("a" in held)
        speed = SNEAK if "left.shift" in held else SPRINT if "left.control" in held and forward > 0 else WALK
        yaw = math.radians(self.yaw)
        move = (forward * np.array([-math.sin(yaw), math.cos(yaw)])
                + right * np.array([-math.cos(yaw), -math.sin(yaw)]))
        if np.any(move):
            move *= speed / np.linalg.norm(move)
        for axis in (0, 1):   # move along x, then z, so the player slides along walls
            if move[axis] == 0:
                continue
            target = self.pos.copy()
            target[2 * axis] += move[axis]
            ahead = target.copy()
            ahead[2 * axis] += 0.3 * np.sign(move[axis])      # the player is 0.6 blocks wide
            rise = self.ground_at(ahead[0], ahead[2]) - self.pos[1]
            if self.leaves_block(ahead[0], ahead[2]):
                continue
            if rise <= 0:
                self.pos = target
            elif rise <= 1 and self.on_ground:                 # auto-jump onto one block
                self.vy, self.on_ground = JUMP_VELOCITY, False
        if "space" in held and self.on_ground:
            self.vy, self.on_ground = JUMP_VELOCITY, False
        self.vy = (self.vy - GRAVITY) * AIR_DRAG
        self.pos[1] += self.vy
        floor = self.ground_at(self.pos[0], self.pos[2])
        if self.pos[1] <= floor:
            self.pos[1], self.vy, self.on_ground = floor, 0.0, True
        self._attack(0 in inp.buttons)

    def _attack(self, held):
        """Holding attack for BREAK_TICKS on the same block breaks it: a visible action effect."""
        hit = self.cast(self.eye(), self.view_axes()[0][None], max_distance=REACH)  # the crosshair's ray
        target = None
        if hit["distance"][0] < np.inf:
            target = (int(hit["x"][0]), int(hit["z"][0]), bool(hit["leaf"][0]))
        if not held or target is None or target != self.break_target:
            self.breaking, self.break_target = 0, target
        if held and target is not None:
            self.breaking += 1
            if self.breaking >= BREAK_TICKS:
                x, z, leaf = target
                if leaf:
                    self.leaf_low[x, z] = self.leaf_high[x, z] = 0
                elif self.height[x, z] > 1 and self.top[x, z] != WATER:
                    self.height[x, z] -= 1     # the block below shows; trunks stay logs
                self.breaking = 0

    def state(self):
        return np.array([self.yaw, self.pitch, *self.pos], np.float32)

    def line(self, tick, inp, previous=None):
        """The jsonl line a VPT recorder writes for this tick: the state before the input."""
        previous = previous or PlayerInput()
        return {
            "mouse": {"x": 640.0, "y": 360.0, "dx": float(inp.dx), "dy": float(inp.dy),
                      "scaledX": 0.0, "scaledY": 0.0, "dwheel": float(inp.dwheel),
                      "buttons": sorted(inp.buttons), "newButtons": sorted(inp.buttons - previous.buttons)},
            "keyboard": {"keys": sorted(inp.keys), "newKeys": sorted(inp.keys - previous.keys), "chars": ""},
            "isGuiOpen": False, "isGuiInventory": False, "hotbar": self.hotbar,
            "yaw": self.yaw, "pitch": self.pitch,
            "xpos": float(self.pos[0]), "ypos": float(self.pos[1]), "zpos": float(self.pos[2]),
            "tick": tick, "milli": 1_700_000_000_000 + tick * 50,
        }

    # --- rendering --------------------------------------------------------------
    def eye(self):
        return self.pos + np.array([0.0, EYE_HEIGHT, 0.0])

    def view_axes(self):
        """Unit vectors (forward, right, up) of the camera."""
        yaw, pitch = math.radians(self.yaw), math.radians(self.pitch)
        forward = np.array([-math.sin(yaw) * math.cos(pitch), -math.sin(pitch),
                            math.cos(yaw) * math.cos(pitch)])
        right = np.array([-math.cos(yaw), 0.0, -math.sin(yaw)])
        return forward, right, np.cross(right, forward)

    def cast(self, origin, directions, max_distance=VIEW_DISTANCE):
        """March rays through the columns (2-D DDA over x, z; each column is ground [0, height)
        plus optional leaves [leaf_low, leaf_high)). Returns per ray: distance (inf = nothing hit),
        face (0 top, 1 bottom, 2 x-side, 3 z-side), hit block x, y, z, and whether it was leaves."""
        n = len(directions)
        out = {"distance": np.full(n, np.inf), "face": np.zeros(n, np.int64), "leaf": np.zeros(n, bool),
               "x": np.zeros(n, np.int64), "y": np.zeros(n, np.int64), "z": np.zeros(n, np.int64)}
        d = directions.astype(np.float64)
        with np.errstate(divide="ignore"):
            inverse = 1.0 / np.where(d == 0, 1e-12, d)
        cell_x = np.full(n, math.floor(origin[0]))
        cell_z = np.full(n, math.floor(origin[2]))
        step_x, step_z = np.where(d[:, 0] > 0, 1, -1), np.where(d[:, 2] > 0, 1, -1)
        next_x = (cell_x + (step_x > 0) - origin[0]) * inverse[:, 0]   # ray t at the next x border
        next_z = (cell_z + (step_z > 0) - origin[2]) * inverse[:, 2]
        delta_x, delta_z = np.abs(inverse[:, 0]), np.abs(inverse[:, 2])
        t_in = np.zeros(n)
        side = np.full(n, 2)                  # the face a ray entering this cell crosses
        live = np.arange(n)
        while live.size:
            cx, cz = cell_x[live] % WORLD_SIZE, cell_z[live] % WORLD_SIZE
            dy = d[live, 1]
            t0, t1 = t_in[live], np.minimum(next_x[live], next_z[live])
            y0, y1 = origin[1] + t0 * dy, origin[1] + t1 * dy
            top, low, high = self.height[cx, cz], self.leaf_low[cx, cz], self.leaf_high[cx, cz]
            inv_dy = inverse[live, 1]
            # Ground: entered through its side, or the ray comes down through its top face.
            t_ground = np.where(y0 < top, t0, np.where(y1 < top, (top - origin[1]) * inv_dy, np.inf))
            f_ground = np.where(y0 < top, side[live], 0)
            # Leaves: through a side, down through the top, or up through the bottom.
            in_leaf = (y0 >= low) & (y0 < high)
            t_leaf = np.where(in_leaf, t0, np.where((y0 >= high) & (y1 < high), (high - origin[1]) * inv_dy,
                              np.where((y0 < low) & (y1 >= low), (low - origin[1]) * inv_dy, np.inf)))
            f_leaf = np.where(in_leaf, side[live], np.where(y0 >= high, 0, 1))
            t_leaf = np.where(high > low, t_leaf, np.inf)
            t_hit = np.minimum(t_ground, t_leaf)
            hit = t_hit <= max_distance
            if hit.any():
                rays, leaf = live[hit], t_leaf[hit] < t_ground[hit]
                t = t_hit[hit]
                out["distance"][rays], out["leaf"][rays] = t, leaf
                face = np.where(leaf, f_leaf[hit], f_ground[hit])
                out["face"][rays] = face
                y_hit = origin[1] + t * dy[hit]
                # A top face belongs to the block below it, a bottom face to the block above.
                out["y"][rays] = np.where(face == 0, np.round(y_hit) - 1,
                                          np.where(face == 1, np.round(y_hit), np.floor(y_hit)))
                out["x"][rays], out["z"][rays] = cx[hit], cz[hit]
            # Rays that hit nothing move to the next column, unless they are done for good.
            going_x = next_x[live] < next_z[live]
            gone = hit | (t1 > max_distance) | ((y1 > MAX_HEIGHT) & (dy >= 0))
            live, going_x = live[~gone], going_x[~gone]
            ax, az = live[going_x], live[~going_x]       # rays crossing an x border, a z border
            t_in[ax], t_in[az] = next_x[ax], next_z[az]
            cell_x[ax] += step_x[ax]
            cell_z[az] += step_z[az]
            next_x[ax] += delta_x[ax]
            next_z[az] += delta_z[az]
            side[ax], side[az] = 2, 3
        return out

    def sky(self, directions):
        """Sky color per ray: the horizon (and so the fog) tinted by compass direction, like a
        sky late in the day (warm towards the sun, cooler away from it, violet to its right), the
        sun, and a ring of distant mountains whose outline depends on the compass direction."""
        elevation = np.arcsin(np.clip(directions[:, 1], -1, 1))
        azimuth = np.arctan2(directions[:, 0], directions[:, 2])
        toward_sun = directions @ SUN_DIRECTION
        horizon = (np.array([0.72, 0.8, 0.92])
                   + 0.2 * np.cos(azimuth - SUN_AZIMUTH)[:, None] * np.array([1.0, 0.45, -0.5])
                   + 0.15 * np.sin(azimuth - SUN_AZIMUTH)[:, None] * np.array([0.45, -0.35, 0.3]))
        zenith = np.array([0.35, 0.55, 0.95])
        mix = np.clip(elevation / 0.6, 0, 1)[:, None]
        color = horizon * (1 - mix) + zenith * mix
        skyline = (0.06 + 0.05 * np.sin(2 * azimuth + 1.3) + 0.035 * np.sin(5 * azimuth + 0.4)
                   + 0.02 * np.sin(11 * azimuth + 2.0))
        mountain = elevation < skyline
        color[mountain] = np.array([0.45, 0.5, 0.68]) + 0.1 * np.sin(3 * azimuth[mountain])[:, None]
        color[toward_sun > 0.996] = np.array([1.0, 0.98, 0.8])
        return np.clip(color, 0, 1), horizon

    def block_colors(self, hit, directions, eye):
        """Color of each hit face: block type by height in its column, face shading, grain."""
        x, y, z, face = hit["x"], hit["y"], hit["z"], hit["face"]
        top, height = self.top[x, z], self.height[x, z]
        # Stone underneath, 3 blocks of soil under the top block (sand under sand, else dirt),
        # the column's top block, and tree trunks (logs) from where they start.
        kind = np.full(len(x), STONE)
        soil = (y >= height - 4) & (top != STONE) & (top != SNOW)
        kind[soil] = np.where(top == SAND, SAND, DIRT)[soil]
        kind[y >= height - 1] = top[y >= height - 1]
        kind[y >= self.log_from[x, z]] = LOG
        point = eye + hit["distance"][:, None] * directions
        # Grass blocks have a green fringe on the top quarter of their sides, dirt below it.
        below_fringe = (kind == GRASS) & (face >= 2) & (point[:, 1] - y < 0.75)
        kind[below_fringe] = DIRT
        kind[hit["leaf"]] = LEAVES
        # 4x4 texels per face, each with its own brightness (Minecraft's 16x16 textures, coarser)
        u = np.where(face >= 2, np.where(face == 2, point[:, 2], point[:, 0]), point[:, 0])
        v = np.where(face >= 2, point[:, 1], point[:, 2])
        grain = hash_noise(x, y, z, np.floor(u * 4), np.floor(v * 4))
        return BLOCK_RGB[kind] * (self.face_shade(face, directions) * (0.82 + 0.3 * grain))[:, None]

    @staticmethod
    def face_shade(face, directions):
        """Top and bottom faces as in Minecraft; a side face by where its normal points: 0.8 on
        average, brighter towards the sun, a little brighter 90 degrees to the sun's left. The
        four sides differ, so the terrain itself shows which way the player faces."""
        side_x = np.where(face == 2, -np.sign(directions[:, 0]), 0.0)   # a side's outward normal
        side_z = np.where(face == 3, -np.sign(directions[:, 2]), 0.0)
        normal_azimuth = np.arctan2(side_x, side_z)
        side = (0.8 + 0.15 * np.cos(normal_azimuth - SUN_AZIMUTH)
                + 0.07 * np.sin(normal_azimuth - SUN_AZIMUTH))
        return np.where(face >= 2, side, FACE_SHADE[np.minimum(face, 1)]).astype(np.float32)

    def frame(self):
        """Render what the player sees: a 640x360 BGR uint8 image with the game's HUD."""
        width, height = RENDER_SIZE
        forward, right, up = self.view_axes()
        half_h = math.tan(FOV_Y / 2)
        half_w = half_h * width / height
        px = (np.arange(width) + 0.5) / width * 2 - 1
        py = 1 - (np.arange(height) + 0.5) / height * 2
        directions = (forward + px[None, :, None] * half_w * right
                      + py[:, None, None] * half_h * up).reshape(-1, 3)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        eye = self.eye()
        color, horizon = self.sky(directions)
        hit = self.cast(eye, directions)
        solid = hit["distance"] < np.inf
        # Haze: fog thickens from FOG_START to VIEW_DISTANCE, and a thin haze (HAZE) lies over
        # everything, coloured like the horizon it is seen against (so by compass direction).
        fog = np.clip((hit["distance"][solid] - FOG_START) / (VIEW_DISTANCE - FOG_START), HAZE, 1)[:, None]
        solid_hit = {key: value[solid] for key, value in hit.items()}
        block = self.block_colors(solid_hit, directions[solid], eye)
        color[solid] = block * (1 - fog) + horizon[solid] * fog
        image = (color.reshape(height, width, 3)[:, :, ::-1] * 255).astype(np.uint8)
        image = cv2.resize(image, VIDEO_SIZE, interpolation=cv2.INTER_NEAREST)
        self.draw_hud(image)
        return image

    def draw_hud(self, image):
        """Crosshair and hotbar (selected slot framed in white), big enough to survive 64x64."""
        cx, cy = VIDEO_SIZE[0] // 2, VIDEO_SIZE[1] // 2
        cv2.line(image, (cx - 12, cy), (cx + 12, cy), (240, 240, 240), 3)
        cv2.line(image, (cx, cy - 12), (cx, cy + 12), (240, 240, 240), 3)
        slot, y0 = 40, VIDEO_SIZE[1] - 46
        x0 = cx - 9 * slot // 2
        cv2.rectangle(image, (x0 - 3, y0 - 3), (x0 + 9 * slot + 3, y0 + slot + 3), (60, 60, 60), -1)
        for i, (r, g, b) in enumerate(HOTBAR_ITEM_RGB):
            cv2.rectangle(image, (x0 + i * slot + 10, y0 + 10), (x0 + i * slot + 30, y0 + 30), (b, g, r), -1)
        s = x0 + self.hotbar * slot
        cv2.rectangle(image, (s - 2, y0 - 2), (s + slot + 2, y0 + slot + 2), (255, 255, 255), 4)


# -----------------------------------------------------------------------------
# The scripted player: human-like bursts of walking, smooth turns, looking around, idling,
# jumping when blocked, digging, hotbar changes. Randomised per episode, deterministic per seed.

class ScriptedPlayer:
    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        r = self.rng
        # Per-episode temperament, so episodes differ in style as contractors do
        self.turn_speed = r.uniform(0.6, 1.8)     # multiplies how fast turns are made
        self.restless = r.uniform(0.3, 0.7)       # probability that a new move is a walk
        self.sprinter = r.uniform(0.0, 0.5)       # probability that a walk is a sprint
        self.moves, self.move_keys = 0, set()
        self.look = []                            # queued (dx, dy) mouse moves, one per tick
        self.attack_ticks, self.use_ticks = 0, 0
        self.last_pos, self.blocked, self.tick = None, 0, 0

    def _new_move(self):
        r = self.rng
        kind = r.choice(["walk", "strafe", "back", "idle"],
                        p=[self.restless, 0.15, 0.05, 0.8 - self.restless])  # last: idle
        keys = {"walk": {"w"}, "strafe": {r.choice(["a", "d"])}, "back": {"s"}, "idle": set()}[kind]
        if kind == "walk" and r.random() < self.sprinter:
            keys.add("left.control")
        if kind == "walk" and r.random() < 0.08:
            keys.add("left.shift")
        if kind == "walk" and r.random() < 0.2:
            keys.add(r.choice(["a", "d"]))
        self.move_keys = keys
        self.moves = int(r.integers(5, 60 if kind == "walk" else 25))

    def _new_look(self, world):
        """Queue a smooth mouse gesture: a turn, a glance up or down, a dig, or a pause."""
        r = self.rng
        kind = r.choice(["turn", "glance", "still", "dig"], p=[0.5, 0.2, 0.22, 0.08])
        ticks = int(r.integers(6, 36))
        yaw_turn, target_pitch = 0.0, world.pitch
        if kind == "turn":
            yaw_turn = r.choice([-1, 1]) * r.uniform(15, 150) * self.turn_speed
            target_pitch = np.clip(world.pitch + r.normal(0, 10), -30, 45)
        elif kind == "glance":
            target_pitch = r.uniform(-35, 55)
            yaw_turn = r.normal(0, 10)
        elif kind == "dig":
            target_pitch, ticks = r.uniform(35, 70), int(r.integers(5, 12))
            self.attack_ticks = ticks + int(r.integers(10, 40))
        else:
            ticks = int(r.integers(3, 30))
        # A bell-shaped speed profile (slow-fast-slow), as a hand moves a mouse; integer mouse
        # units like the recorder's, with the rounding carried so the total turn is exact.
        profile = np.sin(np.pi * (np.arange(ticks) + 0.5) / ticks)
        profile /= profile.sum()
        dx = np.diff(np.round(np.cumsum(profile * yaw_turn / CAMERA_DEGREES_PER_UNIT)), prepend=0)
        dy = np.diff(np.round(np.cumsum(profile * (target_pitch - world.pitch) / CAMERA_DEGREES_PER_UNIT)), prepend=0)
        jitter = r.integers(-1, 2, size=(ticks, 2)) * (r.random((ticks, 2)) < 0.3)
        self.look = [(int(a), int(b)) for a, b in zip(dx + jitter[:, 0], dy + jitter[:, 1])]

    def act(self, world):
        r = self.rng
        if self.moves <= 0:
            self._new_move()
        if not self.look:
            self._new_look(world)
        self.moves -= 1
        dx, dy = self.look.pop(0)
        keys = set(self.move_keys)
        # Jump when walking into something (the position stopped changing), sometimes for fun
        moved = self.last_pos is None or np.linalg.norm(world.pos[[0, 2]] - self.last_pos) > 0.02
        self.blocked = 0 if moved or not keys & {"w", "a", "s", "d"} else self.blocked + 1
        self.last_pos = world.pos[[0, 2]].copy()
        if self.blocked >= 2 or ("w" in keys and r.random() < 0.015):
            keys.add("space")
        if self.blocked > 12:                    # stuck for good: turn away
            self.blocked, self.look = 0, []
        if r.random() < 0.012:                   # select a hotbar slot with a number key
            keys.add(str(r.integers(1, 10)))
        dwheel = int(r.choice([-1, 1])) if r.random() < 0.01 else 0
        if r.random() < 0.005:
            self.use_ticks = int(r.integers(1, 4))
        # Never attack on the first tick: the converter would take it for the recorder's
        # "attack stuck" quirk and drop it.
        buttons = {0} if self.attack_ticks > 0 and self.tick > 0 else set()
        if self.use_ticks > 0:
            buttons.add(1)
        self.attack_ticks, self.use_ticks = self.attack_ticks - 1, self.use_ticks - 1
        self.tick += 1
        return PlayerInput(keys={f"key.keyboard.{k}" for k in keys}, dx=dx, dy=dy,
                           buttons=buttons, dwheel=dwheel)


def write_synthetic_episode(raw_dir, stem, seed, n_frames):
    """Play one episode in the built-in world and record it exactly like a VPT episode:
    <stem>.mp4 (640x360, 20 fps) and <stem>.jsonl. Files appear only when complete."""
    video_path = os.path.join(raw_dir, stem + ".mp4")
    jsonl_path = os.path.join(raw_dir, stem + ".jsonl")
    if os.path.exists(video_path) and os.path.exists(jsonl_path):
        return
    world, player = World(seed), ScriptedPlayer(seed)
    tmp_video, tmp_jsonl = f"{video_path}.{os.getpid()}.tmp.mp4", f"{jsonl_path}.{os.getpid()}.tmp"
    writer = cv2.VideoWriter(tmp_video, cv2.VideoWriter_fourcc(*"mp4v"), FPS, VIDEO_SIZE)
    previous = PlayerInput()
    with open(tmp_jsonl, "w") as f:
        for tick in range(n_frames):
            frame = world.frame()
            writer.write(frame)
            inp = player.act(world)
            f.write(json.dumps(world.line(tick, inp, previous)) + "\n")
            world.step(inp)
            previous = inp
        if seed % 2:                 # like the real recorder, sometimes write the last frame twice
            writer.write(frame)
    writer.release()
    os.replace(tmp_jsonl, jsonl_path)
    os.replace(tmp_video, video_path)   # the video last: a pair exists only once both are whole


def _synthetic_job(job):
    """Pool worker: play, record and convert one built-in-world episode."""
    raw_dir, out_dir, stem, seed, n_frames, res = job
    write_synthetic_episode(raw_dir, stem, seed, n_frames)
    return _convert_job((os.path.join(raw_dir, stem + ".mp4"), os.path.join(raw_dir, stem + ".jsonl"),
                         out_dir, res))


def make_synthetic(n_episodes, out_dir, res, n_frames, seed, workers, val_fraction):
    """Write n episodes of the built-in world as VPT files under <out>/raw, converting each as
    soon as it is written (both cores busy), then write the index."""
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "episodes"), exist_ok=True)
    check_resolution(out_dir, res)
    # Stems shaped like VPT's <alias>-<12 hex session id>-<date>-<time>; one session each
    jobs = [(raw_dir, out_dir, f"builtin-{seed * 100_000 + i:012x}-20260101-000000",
             seed * 100_000 + i, n_frames, res) for i in range(n_episodes)]
    problems = []
    with Pool(workers) as pool:
        for meta, problem in tqdm(pool.imap_unordered(_synthetic_job, jobs), total=len(jobs),
                                  desc="built-in world", unit="episode"):
            if problem:
                problems.append(problem)
    write_index(out_dir, res, "builtin", val_fraction)
    print(f"built-in world: {len(jobs) - len(problems)} episodes of {n_frames} frames in {out_dir}, "
          f"skipped {len(problems)}")
    for problem in problems:
        print(f"  skipped: {problem}")


def write_preview(path, seed=1):
    """A picture for the README: a recorded 640x360 frame next to what the model sees (64x64)."""
    world = World(seed)
    world.pitch = 15.0                        # look slightly down: terrain, trees and sky
    frame = world.frame()
    small = cv2.resize(cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA), (360, 360),
                       interpolation=cv2.INTER_NEAREST)
    gap = np.full((360, 12, 3), 255, np.uint8)
    cv2.imwrite(path, np.concatenate([frame, gap, small], axis=1))
    print(f"wrote {path}")


def benchmark(raw_dir, res, n_episodes=8):
    """Frames per second, one process, on this machine: built-in-world generation (render +
    mp4 encode), conversion of the first n episodes in raw_dir, and plain decode + resize of
    the same videos (the limit conversion can approach)."""
    pairs = find_episodes(raw_dir)[0][:n_episodes]
    if not pairs:
        sys.exit(f"{raw_dir}: no episodes to measure")
    frames = 0
    started = time.perf_counter()
    for video, _ in pairs:
        capture = cv2.VideoCapture(video)
        while (frame := capture.read()[1]) is not None:
            cv2.resize(frame, (res, res), interpolation=cv2.INTER_AREA)
            frames += 1
    decode = frames / (time.perf_counter() - started)
    out = os.path.join(raw_dir, ".bench")
    started = time.perf_counter()
    for video, jsonl in pairs:
        shutil.rmtree(out, ignore_errors=True)
        convert_episode(video, jsonl, out, res)
    convert = frames / (time.perf_counter() - started)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    os.makedirs(out)
    write_synthetic_episode(out, "bench-000000000000-20260101-000000", 0, 200)
    generate = 200 / (time.perf_counter() - started)
    shutil.rmtree(out, ignore_errors=True)
    print(f"one process, {len(pairs)} episodes, {frames} frames, {res}px:\n"
          f"  built-in world generation (render + mp4 encode): {generate:7.0f} frames/s\n"
          f"  conversion (decode, resize, actions, save):      {convert:7.0f} frames/s\n"
          f"  decode + resize alone (the limit):               {decode:7.0f} frames/s")


# -----------------------------------------------------------------------------
# Downloading VPT episodes: index -> N (mp4, jsonl) pairs, resumable, retried, verified

VPT_INDEX_URL = "https://openaipublic.blob.core.windows.net/minecraft-rl/snapshots/"


class DownloadError(Exception):
    pass


def check_url(url):
    """Only https, except plain http to this machine (the tests' loopback server)."""
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
        raise DownloadError(f"refusing {url}: only https URLs are downloaded "
                            "(plain http only from this machine)")
    return url


def read_index(index):
    """An index is a local file, a URL, or the name of one of OpenAI's VPT indexes."""
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            text, source = f.read(), index
    else:
        url = index if "://" in index else VPT_INDEX_URL + index
        with urllib.request.urlopen(check_url(url), timeout=60) as response:
            text, source = response.read().decode("utf-8"), url
    try:
        data = json.loads(text)
        basedir, relpaths = data["basedir"], data["relpaths"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DownloadError(f"{source}: not a VPT index (expected JSON with 'basedir' and "
                            f"'relpaths'): {e}") from None
    for relpath in relpaths:
        parts = relpath.replace("\\", "/").split("/")
        if relpath.startswith(("/", "\\")) or "://" in relpath or ".." in parts or not relpath.endswith(".mp4"):
            raise DownloadError(f"{source}: refusing unsafe or unexpected relpath {relpath!r} "
                                "(absolute, '..' or not an .mp4)")
    return basedir.rstrip("/") + "/", relpaths


def download_file(url, path, retries=4, backoff=1.0):
    """Download url to path. Resumes a leftover path + '.part' with an HTTP Range request,
    retries with exponential backoff, and checks the size against Content-Length before the
    file gets its final name. Returns False if the server says the file does not exist."""
    check_url(url)
    part = path + ".part"
    for attempt in range(retries):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status != 206:     # the server sent the whole file: start over
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as f, \
                        tqdm(total=total, initial=have, unit="B", unit_scale=True, leave=False,
                             desc=os.path.basename(path)) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and os.path.getsize(part) != total:
                raise DownloadError(f"{url}: got {os.path.getsize(part)} of {total} bytes")
            os.replace(part, path)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            if e.code == 416:                  # our .part is not a prefix the server knows
                os.remove(part)
            error = e
        except (urllib.error.URLError, OSError, DownloadError) as e:
            error = e
        if attempt + 1 < retries:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"{url}: failed after {retries} tries: {error}")


def download_episodes(index, n, raw_dir):
    """Download the first n complete episodes of an index (files missing on the server are
    skipped, as some listed files are) into raw_dir."""
    basedir, relpaths = read_index(index)
    os.makedirs(raw_dir, exist_ok=True)
    done = 0
    with tqdm(total=n, desc="download", unit="episode") as bar:
        for relpath in relpaths:
            if done == n:
                break
            stem = os.path.basename(relpath)[:-len(".mp4")]
            jsonl_rel = relpath[:-len(".mp4")] + ".jsonl"
            try:
                ok = (download_file(basedir + jsonl_rel, os.path.join(raw_dir, stem + ".jsonl"))
                      and download_file(basedir + relpath, os.path.join(raw_dir, stem + ".mp4")))
            except DownloadError as e:
                tqdm.write(f"skipped {stem}: {e}")
                continue
            if ok:
                done += 1
                bar.update(1)
            else:
                tqdm.write(f"skipped {stem}: not on the server")
    if done < n:
        print(f"only {done} of {n} episodes could be downloaded")
    return done


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", type=int, metavar="N", help="write N built-in-world episodes and convert them")
    source.add_argument("--vpt", metavar="DIR", help="convert a folder of <stem>.mp4 + <stem>.jsonl pairs")
    source.add_argument("--download", metavar="INDEX", help="a VPT index: file, URL or name like all_6xx_Jun_29.json")
    source.add_argument("--preview", metavar="PNG", help="write a picture of a built-in-world frame")
    source.add_argument("--bench", metavar="RAW_DIR", help="measure generation, conversion and decode speed")
    parser.add_argument("--n", type=int, default=10, help="episodes to download (with --download)")
    parser.add_argument("--out", help="dataset folder (default data/builtin, or data/vpt for real data)")
    parser.add_argument("--res", type=int, default=64, choices=[64, 128, 224], help="frame size in pixels")
    parser.add_argument("--frames", type=int, default=300, help="frames per built-in-world episode (20 per second)")
    parser.add_argument("--seed", type=int, default=0, help="built-in world: episode i uses seed*100000+i")
    parser.add_argument("--workers", type=int, default=2, help="processes (one episode each)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="share of sessions held out for validation")
    args = parser.parse_args(argv)
    if args.preview:
        return write_preview(args.preview)
    if args.bench:
        return benchmark(args.bench, args.res)
    out = args.out or ("data/builtin" if args.synthetic else "data/vpt")
    started = time.time()
    if args.synthetic:
        make_synthetic(args.synthetic, out, args.res, args.frames, args.seed, args.workers, args.val_fraction)
    else:
        raw_dir = args.vpt or os.path.join(out, "raw")
        if args.download:
            try:
                download_episodes(args.download, args.n, raw_dir)
            except (DownloadError, urllib.error.URLError, OSError) as e:
                sys.exit(f"download failed: {e}")
        if not os.path.isdir(raw_dir):
            sys.exit(f"{raw_dir}: no such folder")
        convert_folder(raw_dir, out, args.res, "vpt", args.workers, args.val_fraction)
    print(f"done in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
