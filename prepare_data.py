"""
prepare_data.py: Minecraft-style video -> a training-ready dataset for iwm.py. Three sources, one
converter (so the built-in world is read exactly like real data):

    python prepare_data.py --synthetic 64                # built-in world: render, record, convert
    python prepare_data.py --vpt DIR                     # folder of real VPT <stem>.mp4 + <stem>.jsonl
    python prepare_data.py --download all_6xx_Jun_29.json --n 10   # fetch VPT episodes, then convert

Every mode takes --out DIR and --res R (64, 128 or 224). docs/data.md describes the recordings
and the dataset folder. Sections: action conversion -> reading episodes -> the dataset -> the
built-in world -> the scripted player -> downloading -> main.
"""
import argparse
import contextlib
import glob
import hashlib
import ipaddress
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
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

# Held keys -> MineRL action names. Any other key is ignored.
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
SCENE_COLUMNS = ["crosshairDistance"]   # only the built-in world records these (a 3-D probe's target)


class EpisodeError(Exception):
    """A problem with one episode's files: the episode is skipped, the others go on."""


class DatasetError(ValueError):
    """A problem with a dataset folder as a whole."""


FLOAT32_MAX = float(np.finfo(np.float32).max)   # a larger number would be stored as infinity
EXPECTED = {float: f"a finite number (at most {FLOAT32_MAX:.3g} in size)", bool: "true or false",
            str: "a string", int: "a whole number", list: "a list", dict: "an object"}


def is_a(value, kind):
    """Whether a parsed JSON value is of this kind. float: any number that is finite as a float32
    (JSON readers accept NaN and Infinity). A JSON true or false is a bool, never a number."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def checked(container, key, kind, item_kind=None):
    """container[key] if it is None (missing or null: no input) or of this kind, a list's items
    of item_kind; else EpisodeError naming the key and what was expected."""
    value = container.get(key)
    if value is not None and not is_a(value, kind):
        raise EpisodeError(f"{key} is {value!r}, expected {EXPECTED[kind]}")
    for item in value if item_kind and value else []:
        if not is_a(item, item_kind):
            raise EpisodeError(f"{key} holds {item!r}, expected only items that are {EXPECTED[item_kind]}")
    return value


def actions_from_lines(lines):
    """Convert parsed jsonl lines to (actions (N, A) float32, state (N, 5) float32 or None); the
    state has a sixth column, SCENE_COLUMNS, where every line records it (the built-in world).
    Row i is the action taken while frame i was shown (its effect shows in frame i+1)."""
    actions = np.zeros((len(lines), len(ACTION_COLUMNS)), np.float32)
    hotbars, states = [], []
    attack_stuck = False
    for i, line in enumerate(lines):
        try:
            mouse, keyboard = checked(line, "mouse", dict) or {}, checked(line, "keyboard", dict) or {}
            new_buttons = checked(mouse, "newButtons", list, int) or []
            if i == 0:     # "attack stuck": the recorder, not the player, holds attack until pressed again
                attack_stuck = new_buttons == [0]
            elif 0 in new_buttons:
                attack_stuck = False
            for key in checked(keyboard, "keys", list, str) or []:
                if key in KEY_TO_ACTION:
                    actions[i, COLUMN[KEY_TO_ACTION[key]]] = 1
            for button in checked(mouse, "buttons", list, int) or []:
                if button in BUTTON_TO_ACTION and not (button == 0 and attack_stuck):
                    actions[i, COLUMN[BUTTON_TO_ACTION[button]]] = 1
            # Floats on purpose: OpenAI's loader stored these in an int array and lost every
            # move under one degree (their issue #54).
            actions[i, COLUMN["camera_pitch"]] = (checked(mouse, "dy", float) or 0) * CAMERA_DEGREES_PER_UNIT
            actions[i, COLUMN["camera_yaw"]] = (checked(mouse, "dx", float) or 0) * CAMERA_DEGREES_PER_UNIT
            actions[i, COLUMN["gui_open"]] = float(bool(checked(line, "isGuiOpen", bool)))
            checked(mouse, "x", float), checked(mouse, "y", float)      # where read_frames draws the cursor
            hotbars.append(checked(line, "hotbar", float))
            states.append([checked(line, k, float) for k in STATE_COLUMNS + SCENE_COLUMNS])
        except EpisodeError as e:
            raise EpisodeError(f"line {i + 1}: {e}") from None
    # Scroll-wheel hotbar changes are visible only as a change of `hotbar` between lines.
    # MineRL's causal convention: action i caused the state on line i+1, so the key goes on i.
    for i, (now, after) in enumerate(zip(hotbars, hotbars[1:])):
        if now is not None and after is not None and now != after and after in range(9):
            actions[i, COLUMN[f"hotbar.{int(after) + 1}"]] = 1
    if not states or any(None in state[:len(STATE_COLUMNS)] for state in states):
        return actions, None
    columns = len(STATE_COLUMNS + SCENE_COLUMNS) if all(None not in state for state in states) else len(STATE_COLUMNS)
    return actions, np.array([state[:columns] for state in states], np.float32)


# -----------------------------------------------------------------------------
# Reading one episode: jsonl lines, then frames paired with them

def read_jsonl(path):
    """Parse a VPT action file: one JSON object per line. Errors name the file and line."""
    lines = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:     # -sig: a leading BOM is no error
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
    tip = np.clip(np.array([x, y]) * VIDEO_SIZE[1] / WINDOW_HEIGHT, -100, 1000)   # far off-screen: not drawn
    arrow = np.array([[0, 0], [0, 14], [4, 10], [7, 16], [9, 15], [6, 9], [11, 9]], np.float64)
    points = np.round(tip + arrow).astype(np.int32)
    cv2.fillPoly(frame_bgr, [points], (255, 255, 255))
    cv2.polylines(frame_bgr, [points], True, (0, 0, 0), 1)


def dataset_frame(frame_bgr, res):
    """A video frame as the dataset stores it: squashed to res x res, RGB. INTER_AREA averages
    the pixels a target pixel covers (INTER_LINEAR, OpenAI's choice, aliases badly at 64)."""
    return np.ascontiguousarray(cv2.resize(frame_bgr, (res, res), interpolation=cv2.INTER_AREA)[:, :, ::-1])


def read_frames(video_path, lines, res):
    """Decode the video, draw the cursor on GUI-open frames, squash to res x res RGB. A video has
    N or N+1 frames for N lines (the recorder writes the last frame twice); anything else is a
    broken episode. Frames are counted by decoding, not by the file's metadata."""
    capture = cv2.VideoCapture(str(video_path))
    if not capture.isOpened():
        raise EpisodeError(f"{video_path}: OpenCV cannot open this video")
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    fps = capture.get(cv2.CAP_PROP_FPS)
    if size != VIDEO_SIZE:
        raise EpisodeError(f"{video_path}: resolution {size[0]}x{size[1]}, expected {VIDEO_SIZE[0]}x{VIDEO_SIZE[1]}")
    if abs(fps - FPS) > 0.5:
        raise EpisodeError(f"{video_path}: {fps:g} fps, expected {FPS}")
    frames = np.empty((len(lines), res, res, 3), np.uint8)
    count = 0
    while count <= len(lines) + 1:           # read one past N+1 to detect too many frames
        ok, frame = capture.read()
        if not ok:
            break
        if count < len(lines):
            mouse = lines[count].get("mouse") if isinstance(lines[count].get("mouse"), dict) else {}
            if lines[count].get("isGuiOpen") and all(isinstance(mouse.get(k), (int, float)) for k in "xy"):
                draw_cursor(frame, mouse["x"], mouse["y"])
            frames[count] = dataset_frame(frame, res)
        count += 1
    capture.release()
    if count not in (len(lines), len(lines) + 1):
        got = f"{count}" if count <= len(lines) + 1 else f"more than {len(lines) + 1}"
        raise EpisodeError(f"{video_path}: {got} frames for {len(lines)} action lines "
                           f"(expected {len(lines)} or {len(lines) + 1})")
    return frames


def read_episode(video_path, jsonl_path, res):
    """(frames, actions, state) of one raw episode; errors name the file (and the line)."""
    lines = read_jsonl(jsonl_path)
    try:
        actions, state = actions_from_lines(lines)
    except EpisodeError as e:
        raise EpisodeError(f"{jsonl_path}: {e}") from None
    return read_frames(video_path, lines, res), actions, state


# -----------------------------------------------------------------------------
# The dataset: one folder, one subfolder per finished episode, an index with the split

VPT_STEM = re.compile(r"(.+-[0-9a-f]{12})-\d{8}-\d{6}")   # <alias>-<12 hex session id>-<date>-<time>


def session_of(stem):
    """The recording session of an episode: VPT's chunks of one session share <alias>-<id>. An
    episode named any other way (your own recordings) is a session of its own."""
    match = VPT_STEM.fullmatch(stem)
    return match.group(1) if match else stem


def split_key(stem, split_by):
    """What the split keeps together: the recording session (default) or the episode itself."""
    return session_of(stem) if split_by == "session" else stem


def split_of(stem, val_fraction, split_by="session"):
    """Deterministic train/val split by recording session (or, with split_by="episode", by
    episode), so that chunks of one session land on the same side."""
    key = split_key(stem, split_by)
    return "val" if int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2 ** 64 < val_fraction else "train"


def convert_episode(video_path, jsonl_path, out_dir, res):
    """Convert one raw episode into <out_dir>/episodes/<stem>/ and return its meta dict. Written
    to a temporary folder and renamed at the end, so a killed run never leaves a half-written
    episode that loads; a finished episode is skipped on a rerun."""
    stem = os.path.splitext(os.path.basename(video_path))[0]
    final = os.path.join(out_dir, "episodes", stem)
    meta = read_meta(final)
    if meta is not None:
        return meta
    frames, actions, state = read_episode(video_path, jsonl_path, res)
    tmp = os.path.join(out_dir, PARTIAL, stem)
    try:
        os.makedirs(tmp)
        for name, array in (("frames", frames), ("actions", actions), ("state", state)):
            if array is not None:
                np.save(os.path.join(tmp, f"{name}.npy"), array)
        meta = {"name": stem, "frames": len(frames), "has_state": state is not None,
                "null_actions": int((actions[:, :-1] == 0).all(axis=1).sum())}
        with open(os.path.join(tmp, "meta.json"), "w") as f:   # meta.json last: it marks "done"
            json.dump(meta, f)
    except OSError as e:               # a full disk, say: the message names the folder, not the video
        shutil.rmtree(tmp, ignore_errors=True)
        raise EpisodeError(f"{final}: could not be written ({e.strerror or e}); free some space and run again") from None
    shutil.rmtree(final, ignore_errors=True)               # a stale folder without a good meta.json
    os.rename(tmp, final)
    return meta


def read_meta(folder):
    """A converted episode's meta.json, or None where it is missing, empty or cut short (the
    episode is then not finished: it is converted again, or left out of the index)."""
    with contextlib.suppress(OSError, ValueError):
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        if isinstance(meta, dict) and "name" in meta:
            return meta
    return None


def _convert_job(job):
    """Pool worker: convert one episode, turning any failure into a message (never raises)."""
    try:
        return convert_episode(*job), None
    except EpisodeError as e:
        return None, str(e)
    except Exception as e:  # an unexpected bug or I/O error must not stop the other episodes
        return None, f"{job[0]}: {type(e).__name__}: {e}"


def find_episodes(raw_dir):
    """Pairs (mp4, jsonl) in a folder; a file without its partner is reported, not converted.
    A folder with no pair but videos in its subfolders is an error that names them."""
    pairs, problems = [], []
    for stem, found in recordings_by_stem(raw_dir).items():
        if len(found) == 2:
            pairs.append((os.path.join(raw_dir, found[".mp4"]), os.path.join(raw_dir, found[".jsonl"])))
        else:
            (name, missing), = ((name, {".mp4": ".jsonl", ".jsonl": ".mp4"}[ext]) for ext, name in found.items())
            problems.append(f"{os.path.join(raw_dir, name)}: no matching {stem}{missing}")
    if pairs or problems:
        return pairs, problems
    below = sorted({os.path.dirname(path) for path in glob.glob(os.path.join(glob.escape(raw_dir), "**", "*.*"),
                                                                 recursive=True) if path.lower().endswith(".mp4")})
    raise DatasetError(f"{raw_dir}: no <stem>.mp4 + <stem>.jsonl pairs in it" + (
        f", but there are .mp4 files in {', '.join(below[:3])}: pass that folder to --vpt" if below else ""))


def recordings_by_stem(folder):
    """The .mp4 and .jsonl files of a folder, extensions in any case: {stem: {".mp4": name,
    ".jsonl": name}}, sorted by stem."""
    by_stem = {}
    for name in sorted(os.listdir(folder), key=os.path.splitext):
        stem, ext = os.path.splitext(name)
        if ext.lower() in (".mp4", ".jsonl"):
            by_stem.setdefault(stem, {})[ext.lower()] = name
    return by_stem


PARTIAL = "partial"      # <out>/partial: episodes and built-in recordings being written (ours alone)


def episode_folders(out_dir):
    """Names of the folders in <out_dir>/episodes, sorted (a name may start with a dot)."""
    folder = os.path.join(out_dir, "episodes")
    return sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))


def jsonl_beside(video_path):
    """The <stem>.jsonl (extensions in any case) beside a <stem>.mp4, or None."""
    folder, (stem, ext) = os.path.dirname(video_path) or ".", os.path.splitext(os.path.basename(video_path))
    if ext.lower() != ".mp4" or not os.path.isfile(video_path):
        return None
    jsonl = recordings_by_stem(folder)[stem].get(".jsonl")
    return jsonl and os.path.join(folder, jsonl)


def start_dataset(out_dir, res):
    """Create the folders, refuse a folder of another resolution (its index says so,
    or, after a run killed before it wrote one, its episodes' frames), and remove what killed
    runs left in <out_dir>/partial. Nothing else in the folder is touched."""
    os.makedirs(os.path.join(out_dir, "episodes"), exist_ok=True)
    sizes = {read_index(out_dir)["resolution"]} if os.path.exists(os.path.join(out_dir, "index.json")) else set()
    for name in episode_folders(out_dir):
        with contextlib.suppress(OSError, ValueError):
            sizes.add(np.load(os.path.join(out_dir, "episodes", name, "frames.npy"), mmap_mode="r").shape[1])
    if sizes - {res}:
        old = min(sizes - {res})
        raise DatasetError(f"{out_dir} already holds {old}x{old} episodes; use another --out for --res {res}")
    shutil.rmtree(os.path.join(out_dir, PARTIAL), ignore_errors=True)
    os.makedirs(os.path.join(out_dir, PARTIAL))


FOLDER_LOCKS = {}      # folder -> its open lock file, held by this process until it exits


def lock_folder(folder, lock_name, holder, flag):
    """Hold an exclusive lock on <folder>/<lock_name> while this process lives (the OS drops it
    even after a kill -9), so that two runs never write one folder. Unix only: without fcntl
    (Windows) nothing is locked. Returns whether this call took the lock."""
    try:
        import fcntl
    except ImportError:
        return False
    if os.path.realpath(folder) in FOLDER_LOCKS:        # this process holds it already
        return False
    handle = open(os.path.join(folder, lock_name), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DatasetError(f"{folder} is in use by {holder}: wait for it to end, or choose another {flag}") from None
    FOLDER_LOCKS[os.path.realpath(folder)] = handle
    return True


def release_folder(folder):
    """Give up this process's lock on a folder (exiting does it too)."""
    with contextlib.suppress(KeyError):
        FOLDER_LOCKS.pop(os.path.realpath(folder)).close()


def convert_folder(raw_dir, out_dir, res, source, workers=2, val_fraction=0.1, split_by="session"):
    """Convert every episode pair in raw_dir, then write the index. Returns (converted, problems)."""
    pairs, problems = find_episodes(raw_dir)
    return run_jobs(_convert_job, [(video, jsonl, out_dir, res) for video, jsonl in pairs], "convert", out_dir, res,
                    source, workers, (val_fraction, split_by), problems)


def run_jobs(job, jobs, desc, out_dir, res, source, workers, split, problems=()):
    """Run one episode per process (both cores busy), report each failure and go on, then write
    the index with split = (val_fraction, split_by). The dataset folder is locked meanwhile: two
    conversions into one folder would remove each other's work. Returns (episodes converted, problems)."""
    os.makedirs(out_dir, exist_ok=True)
    locked = lock_folder(out_dir, "convert.lock", "another run of prepare_data.py", "--out")
    try:
        start_dataset(out_dir, res)
        problems, converted = list(problems), 0
        with Pool(workers, initializer=quiet_worker) as pool:   # leaving the block (an error, Ctrl-C) ends the workers
            for meta, problem in tqdm(pool.imap_unordered(job, jobs), total=len(jobs), desc=desc, unit="episode"):
                if problem:
                    problems.append(problem)
                    tqdm.write(f"skipped: {problem}")
                converted += meta is not None
        write_index(out_dir, res, source, *split)
    finally:
        if locked:
            release_folder(out_dir)
    print(f"{desc}: {converted} episodes in {out_dir}, skipped {len(problems)}" + "".join(f"\n  skipped: {p}" for p in problems))
    return converted, problems


def quiet_worker():
    """In each worker process: the main process alone handles Ctrl-C, SIGTERM and SIGHUP; it
    ends the workers (SIGTERM, which a worker obeys at once) and says what was kept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def write_index(out_dir, res, source, val_fraction, split_by="session"):
    """Rebuild index.json from the finished episodes (written atomically)."""
    episodes = []
    for name in episode_folders(out_dir):
        meta = read_meta(os.path.join(out_dir, "episodes", name))
        if meta is None or meta["name"] != name:
            print(f"skipped: {os.path.join(out_dir, 'episodes', name)}: no readable meta.json of this episode (a "
                  "conversion cut short, or copied in by hand); delete the folder and run again")
            continue
        episodes.append({**meta, "split": split_of(name, val_fraction, split_by)})
    balance_split(episodes, split_by)
    index = {"format": 1, "source": source, "fps": FPS, "resolution": res, "action_columns": ACTION_COLUMNS,
             "state_columns": STATE_COLUMNS,
             "scene_columns": SCENE_COLUMNS, "val_fraction": val_fraction, "split_by": split_by, "episodes": episodes}
    write_json(os.path.join(out_dir, "index.json"), index)


def balance_split(episodes, split_by):
    """A small dataset may hash every session to one side: then the lowest-hash session goes to
    validation (or the highest-hash one to training), still deterministic and still by session."""
    groups = {}
    for episode in episodes:
        key = hashlib.sha1(split_key(episode["name"], split_by).encode()).hexdigest()
        groups.setdefault(key, []).append(episode)
    sides = {e["split"] for e in episodes}
    if len(groups) > 1 and len(sides) == 1:
        moved, side = (min(groups), "val") if sides == {"train"} else (max(groups), "train")
        for episode in groups[moved]:
            episode["split"] = side


def split_episodes(data_dir, index, episodes):
    """(training episodes, validation episodes), or a DatasetError that says why one side is empty
    and which flag fixes it."""
    train = [e for e in episodes if e["split"] == "train"]
    val = [e for e in episodes if e["split"] == "val"]
    if train and val:
        return train, val
    by = index.get("split_by", "session")
    groups = len({split_key(e["name"], by) for e in episodes})
    advice = ("add episodes" if len(episodes) < 2 else
              f"add episodes of another recording session, or split by episode: python prepare_data.py "
              f"--vpt <your folder> --out {data_dir} --split episode" if groups == 1 else
              f"rebuild its index: run prepare_data.py again with --out {data_dir}")
    raise DatasetError(f"{data_dir}: needs both training and validation episodes, and its split (by {by}; "
                       f"{groups} {'session' if by == 'session' else 'episode'}{'s' * (groups != 1)}) puts "
                       f"{len(train)} in training and {len(val)} in validation: {advice}")


def strict(value):
    """value with every non-finite float (NaN, infinity) replaced by None: strict JSON, which any
    reader takes, has no such numbers. A figure that cannot be computed is null, not a number."""
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value, **options):
    """value as strict JSON text (json.dumps options may follow)."""
    return json.dumps(strict(value), allow_nan=False, **options)


def write_json(path, value):
    """Write strict JSON to path, whole or not at all (a temporary file, then a rename)."""
    with open(path + ".tmp", "w") as f:
        f.write(to_json(value, indent=1))
    os.replace(path + ".tmp", path)


def read_index(data_dir):
    """A dataset folder's index.json, checked enough that a broken one is named as such."""
    path, rebuild = os.path.join(data_dir, "index.json"), f"rebuild it: run prepare_data.py again with --out {data_dir}"
    if not os.path.exists(path):
        raise DatasetError(f"{path} not found: prepare a dataset first, e.g. `python prepare_data.py --synthetic 64`")
    try:
        with open(path) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); {rebuild}") from None
    if not isinstance(index, dict) or not {"resolution", "action_columns", "episodes"} <= index.keys():
        raise DatasetError(f"{path} is not a dataset index (no resolution, action_columns or episodes); {rebuild}")
    return index


def load_episode(data_dir, meta, res):
    """One episode's arrays, memory-mapped (nothing is read into RAM until it is indexed)."""
    if not isinstance(meta, dict) or not {"name", "split"} <= meta.keys():
        raise EpisodeError(f"{os.path.join(data_dir, 'index.json')}: an episode entry without a name or split; "
                           f"rebuild the index: run prepare_data.py again with --out {data_dir}")
    folder, episode = os.path.join(data_dir, "episodes", str(meta["name"])), dict(meta)
    for name in ("frames", "actions") + (("state",) if meta.get("has_state") else ()):
        try:
            episode[name] = np.load(os.path.join(folder, f"{name}.npy"), mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise EpisodeError(f"{os.path.join(folder, name)}.npy cannot be read ({type(e).__name__}: {e}); missing, "
                               f"truncated or corrupt: delete {folder} and run prepare_data.py again") from None
    frames, actions = episode["frames"], episode["actions"]
    if (frames.dtype != np.uint8 or frames.shape[1:] != (res, res, 3) or actions.shape != (len(frames), len(ACTION_COLUMNS))
            or len(episode.get("state", frames)) != len(frames)):
        raise EpisodeError(f"{folder}: arrays of unexpected shapes (frames {frames.shape} {frames.dtype}, "
                           f"actions {actions.shape}); delete the folder and run prepare_data.py again")
    if not np.isfinite(actions).all():
        raise EpisodeError(f"{folder}: actions.npy holds NaN or infinite values; delete the folder and convert "
                           "the episode again (the converter now refuses them, naming the line)")
    return episode


def load_dataset(data_dir):
    """Open a prepared dataset: (index, list of per-episode dicts of memory-mapped arrays).
    An episode that cannot be read is reported and left out; the others load."""
    index, episodes = read_index(data_dir), []
    for meta in index["episodes"]:
        try:
            episodes.append(load_episode(data_dir, meta, index["resolution"]))
        except EpisodeError as e:
            print(f"skipped episode: {e}")
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
RENDER_SIZE = (96, 54)    # internal render (w, h), upscaled to 640x360: rendering is the slow
                          # part, and the converter squashes frames to 64x64 anyway
REACH = 4.5               # blocks: how far away the player can break a block
BREAK_TICKS = 6           # ticks of holding attack to break one block
SUN_DIRECTION = np.array([0.55, 0.5, 0.67]) / np.linalg.norm([0.55, 0.5, 0.67])
SUN_AZIMUTH = math.atan2(SUN_DIRECTION[0], SUN_DIRECTION[2])   # radians; yaw 0 faces +z
# Walking speeds in blocks per tick (Minecraft: 4.317, 5.612 sprinting, 1.295 sneaking, per s)
WALK, SPRINT, SNEAK = 4.317 / FPS, 5.612 / FPS, 1.295 / FPS
JUMP_VELOCITY, GRAVITY, AIR_DRAG = 0.42, 0.08, 0.98   # Minecraft's per-tick physics
GRASS, DIRT, STONE, SAND, WATER, LOG, LEAVES, SNOW = range(8)
BLOCK_RGB = np.array([[95, 159, 53], [134, 96, 67], [125, 125, 125], [219, 207, 163],
                      [52, 88, 210], [102, 81, 51], [58, 120, 38], [240, 245, 250]], np.float32) / 255
TEXELS = 8                # texels per block edge (Minecraft: 16)
TOP_BOTTOM_SHADE = np.array([1.0, 0.5], np.float32)   # Minecraft's light on top and bottom faces
HOTBAR_ITEM_RGB = [(200, 60, 60), (60, 160, 60), (70, 90, 200), (220, 200, 60), (160, 80, 200),
                   (60, 190, 190), (230, 130, 40), (240, 240, 240), (110, 70, 40)]


def periodic_noise(rng, size, smoothness):
    """Smooth random field that tiles (the torus has no seam): white noise filtered by
    1/f^smoothness in Fourier space, scaled to zero mean and unit std."""
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    spectrum = np.fft.fft2(rng.standard_normal((size, size))) / radius ** smoothness
    spectrum[0, 0] = 0.0
    noise = np.fft.ifft2(spectrum).real
    return (noise - noise.mean()) / noise.std()


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
    keys: set = field(default_factory=set)     # held keys, e.g. {"key.keyboard.w"}
    dx: int = 0                                # mouse movement, window pixels (+ right)
    dy: int = 0                                # (+ down)
    buttons: set = field(default_factory=set)  # held mouse buttons: 0 attack, 1 use, 2 pickItem
    dwheel: int = 0                            # scroll wheel clicks (+ up: hotbar slot - 1)


def input_from_action(action):
    """Invert the converter for one action row (ACTION_COLUMNS), e.g. to execute a plan."""
    return PlayerInput(keys={key for key, name in KEY_TO_ACTION.items() if action[COLUMN[name]] > 0.5},
                       buttons={b for b, name in BUTTON_TO_ACTION.items() if action[COLUMN[name]] > 0.5},
                       dx=int(round(action[COLUMN["camera_yaw"]] / CAMERA_DEGREES_PER_UNIT)),
                       dy=int(round(action[COLUMN["camera_pitch"]] / CAMERA_DEGREES_PER_UNIT)))


class World:
    """The closed-loop API: World(seed) builds terrain; step(input) advances one tick (1/20 s);
    frame() renders what the player sees (640x360 BGR, like a VPT video frame); state() gives
    yaw, pitch, x, y, z; line(tick, input) is the jsonl line a VPT recorder would write, plus
    the distance to the block under the crosshair, which VPT does not record."""

    def __init__(self, seed):
        rng, n = np.random.default_rng(seed), WORLD_SIZE
        hills = periodic_noise(rng, n, 2.4) * 3.0 + periodic_noise(rng, n, 1.5) * 1.2
        mountains = np.maximum(periodic_noise(rng, n, 2.6), 0) ** 2 * 4
        self.height = np.clip(np.round(SEA_LEVEL + 1 + hills + mountains), 2, MAX_HEIGHT - 10).astype(np.int32)
        self.top = np.full((n, n), GRASS, np.int32)
        self.top[self.height <= SEA_LEVEL + 1] = SAND
        self.top[self.height >= SEA_LEVEL + 13] = STONE
        self.top[self.height >= SEA_LEVEL + 17] = SNOW
        water = self.height < SEA_LEVEL
        self.height[water], self.top[water] = SEA_LEVEL, WATER
        self.log_from = np.full((n, n), MAX_HEIGHT, np.int32)  # y where a tree trunk starts
        self.leaf_low, self.leaf_high = np.zeros((2, n, n), np.int32)   # leaves fill [low, high)
        for _ in range(int(n * n * 0.012)):
            x, z = rng.integers(2, n - 2, size=2)
            if self.top[x, z] == GRASS and self.leaf_high[x - 2:x + 3, z - 2:z + 3].max() == 0:
                base, trunk = self.height[x, z], int(rng.integers(4, 6))
                self.leaf_low[x - 1:x + 2, z - 1:z + 2] = base + trunk - 2
                self.leaf_high[x - 1:x + 2, z - 1:z + 2] = base + trunk + 1
                self.log_from[x, z], self.height[x, z] = base, base + trunk
                self.leaf_low[x, z] = base + trunk
        dry = np.argwhere((self.top == GRASS) & (self.leaf_high == 0))   # start on dry land
        x, z = dry[rng.integers(len(dry))]
        self.pos = np.array([x + 0.5, float(self.height[x, z]), z + 0.5])
        self.yaw, self.pitch = float(rng.uniform(-180, 180)), 0.0
        self.vy, self.on_ground, self.hotbar = 0.0, True, 0
        self.breaking, self.break_target = 0, None

    def ground_at(self, x, z):
        return float(self.height[int(math.floor(x)) % WORLD_SIZE, int(math.floor(z)) % WORLD_SIZE])

    def step(self, inp):
        """Advance one tick with this input (the state afterwards is that of the next line)."""
        held = {key.removeprefix("key.keyboard.") for key in inp.keys}
        self.yaw += inp.dx * CAMERA_DEGREES_PER_UNIT
        self.pitch = float(np.clip(self.pitch + inp.dy * CAMERA_DEGREES_PER_UNIT, -90, 90))
        for slot in range(1, 10):
            if str(slot) in held:
                self.hotbar = slot - 1
        self.hotbar = (self.hotbar - int(np.sign(inp.dwheel))) % 9
        forward, right = ("w" in held) - ("s" in held), ("d" in held) - ("a" in held)
        speed = SNEAK if "left.shift" in held else SPRINT if "left.control" in held and forward > 0 else WALK
        yaw = math.radians(self.yaw)
        move = forward * np.array([-math.sin(yaw), math.cos(yaw)]) + right * np.array([-math.cos(yaw), -math.sin(yaw)])
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
            column = int(math.floor(ahead[0])) % WORLD_SIZE, int(math.floor(ahead[2])) % WORLD_SIZE
            low, high = self.leaf_low[column], self.leaf_high[column]
            if high > low and low < self.pos[1] + 1.8 and high > self.pos[1]:   # leaves stop the body (1.8 tall)
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
        self.attack(0 in inp.buttons)

    def attack(self, held):
        """Holding attack for BREAK_TICKS on the same block breaks it: a visible action effect."""
        hit = self.cast(self.eye(), self.view_axes()[0][None], max_distance=REACH)  # the crosshair's ray
        target = (int(hit["x"][0]), int(hit["z"][0]), bool(hit["leaf"][0])) if hit["distance"][0] < np.inf else None
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
        return {"mouse": {"x": 640.0, "y": 360.0, "dx": float(inp.dx), "dy": float(inp.dy),
                          "scaledX": 0.0, "scaledY": 0.0, "dwheel": float(inp.dwheel), "buttons": sorted(inp.buttons),
                          "newButtons": sorted(inp.buttons - previous.buttons)},
                "keyboard": {"keys": sorted(inp.keys), "newKeys": sorted(inp.keys - previous.keys), "chars": ""},
                "isGuiOpen": False, "isGuiInventory": False, "hotbar": self.hotbar, "yaw": self.yaw,
                "pitch": self.pitch, "xpos": float(self.pos[0]), "ypos": float(self.pos[1]),
                "zpos": float(self.pos[2]), "tick": tick, "milli": 1_700_000_000_000 + tick * 50,
                "crosshairDistance": self.crosshair_distance()}

    def crosshair_distance(self):
        """Blocks from the eye to the block under the crosshair; VIEW_DISTANCE where none is seen."""
        distance = self.cast(self.eye(), self.view_axes()[0][None])["distance"][0]
        return float(min(distance, VIEW_DISTANCE))

    def eye(self):
        return self.pos + np.array([0.0, EYE_HEIGHT, 0.0])

    def view_axes(self):
        """Unit vectors (forward, right, up) of the camera."""
        yaw, pitch = math.radians(self.yaw), math.radians(self.pitch)
        forward = np.array([-math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
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
        cell_x, cell_z = np.full(n, math.floor(origin[0])), np.full(n, math.floor(origin[2]))
        step_x, step_z = np.where(d[:, 0] > 0, 1, -1), np.where(d[:, 2] > 0, 1, -1)
        next_x = (cell_x + (step_x > 0) - origin[0]) * inverse[:, 0]   # ray t at the next x border
        next_z = (cell_z + (step_z > 0) - origin[2]) * inverse[:, 2]
        delta_x, delta_z = np.abs(inverse[:, 0]), np.abs(inverse[:, 2])
        t_in, side, live = np.zeros(n), np.full(n, 2), np.arange(n)   # side: the face a ray enters by
        while live.size:
            cx, cz = cell_x[live] % WORLD_SIZE, cell_z[live] % WORLD_SIZE
            dy, inv_dy = d[live, 1], inverse[live, 1]
            t0, t1 = t_in[live], np.minimum(next_x[live], next_z[live])
            y0, y1 = origin[1] + t0 * dy, origin[1] + t1 * dy
            top, low, high = self.height[cx, cz], self.leaf_low[cx, cz], self.leaf_high[cx, cz]
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
                rays, leaf, t = live[hit], t_leaf[hit] < t_ground[hit], t_hit[hit]
                face = np.where(leaf, f_leaf[hit], f_ground[hit])
                y_hit = origin[1] + t * dy[hit]
                # A top face belongs to the block below it, a bottom face to the block above.
                y = np.where(face == 0, np.round(y_hit) - 1, np.where(face == 1, np.round(y_hit), np.floor(y_hit)))
                for key, value in (("distance", t), ("leaf", leaf), ("face", face), ("y", y),
                                   ("x", cx[hit]), ("z", cz[hit])):
                    out[key][rays] = value
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
        """Sky color per ray, and the horizon's: the horizon (and so the fog) is tinted by compass
        direction like a sky late in the day (warm towards the sun, violet to its right); a sun;
        a ring of distant mountains whose outline depends on the compass direction."""
        elevation = np.arcsin(np.clip(directions[:, 1], -1, 1))
        azimuth = np.arctan2(directions[:, 0], directions[:, 2])
        horizon = (np.array([0.72, 0.8, 0.92])
                   + 0.2 * np.cos(azimuth - SUN_AZIMUTH)[:, None] * np.array([1.0, 0.45, -0.5])
                   + 0.15 * np.sin(azimuth - SUN_AZIMUTH)[:, None] * np.array([0.45, -0.35, 0.3]))
        mix = np.clip(elevation / 0.6, 0, 1)[:, None]
        color = horizon * (1 - mix) + np.array([0.35, 0.55, 0.95]) * mix
        skyline = (0.06 + 0.05 * np.sin(2 * azimuth + 1.3) + 0.035 * np.sin(5 * azimuth + 0.4)
                   + 0.02 * np.sin(11 * azimuth + 2.0))
        mountain = elevation < skyline
        color[mountain] = np.array([0.45, 0.5, 0.68]) + 0.1 * np.sin(3 * azimuth[mountain])[:, None]
        color[directions @ SUN_DIRECTION > 0.996] = np.array([1.0, 0.98, 0.8])
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
        kind[(kind == GRASS) & (face >= 2) & (point[:, 1] - y < 0.75)] = DIRT   # grass: a green fringe
        kind[hit["leaf"]] = LEAVES
        # 8x8 texels per face, each with its own brightness (Minecraft's 16x16 textures, coarser)
        u = np.where(face >= 2, np.where(face == 2, point[:, 2], point[:, 0]), point[:, 0])
        v = np.where(face >= 2, point[:, 1], point[:, 2])
        grain = hash_noise(x, y, z, np.floor(u * TEXELS), np.floor(v * TEXELS))
        # A side face is lit by where its normal points (brightest towards the sun, a little
        # brighter 90 degrees to its left): the four sides differ, so the terrain shows the
        # compass direction. Top and bottom faces are lit as in Minecraft.
        normal_azimuth = np.arctan2(np.where(face == 2, -np.sign(directions[:, 0]), 0.0),
                                    np.where(face == 3, -np.sign(directions[:, 2]), 0.0))
        side = 0.8 + 0.15 * np.cos(normal_azimuth - SUN_AZIMUTH) + 0.07 * np.sin(normal_azimuth - SUN_AZIMUTH)
        shade = np.where(face >= 2, side, TOP_BOTTOM_SHADE[np.minimum(face, 1)]).astype(np.float32)
        return BLOCK_RGB[kind] * (shade * (0.7 + 0.5 * grain))[:, None]

    def frame(self):
        """Render what the player sees: a 640x360 BGR uint8 image with the game's HUD."""
        width, height = RENDER_SIZE
        forward, right, up = self.view_axes()
        half_h = math.tan(FOV_Y / 2)
        px = (np.arange(width) + 0.5) / width * 2 - 1
        py = 1 - (np.arange(height) + 0.5) / height * 2
        directions = (forward + px[None, :, None] * (half_h * width / height) * right
                      + py[:, None, None] * half_h * up).reshape(-1, 3)
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        eye = self.eye()
        color, horizon = self.sky(directions)
        hit = self.cast(eye, directions)
        solid = hit["distance"] < np.inf
        # Fog thickens from FOG_START to VIEW_DISTANCE, and a thin haze (HAZE) lies over everything,
        # coloured like the horizon it is seen against (so by compass direction).
        fog = np.clip((hit["distance"][solid] - FOG_START) / (VIEW_DISTANCE - FOG_START), HAZE, 1)[:, None]
        block = self.block_colors({key: value[solid] for key, value in hit.items()}, directions[solid], eye)
        color[solid] = block * (1 - fog) + horizon[solid] * fog
        image = (color.reshape(height, width, 3)[:, :, ::-1] * 255).astype(np.uint8)
        image = cv2.resize(image, VIDEO_SIZE, interpolation=cv2.INTER_NEAREST)
        # The HUD, big enough to survive 64x64: a crosshair, the hotbar with the selected slot framed
        cx, cy, slot, y0 = VIDEO_SIZE[0] // 2, VIDEO_SIZE[1] // 2, 40, VIDEO_SIZE[1] - 46
        cv2.line(image, (cx - 12, cy), (cx + 12, cy), (240, 240, 240), 3)
        cv2.line(image, (cx, cy - 12), (cx, cy + 12), (240, 240, 240), 3)
        x0 = cx - 9 * slot // 2
        cv2.rectangle(image, (x0 - 3, y0 - 3), (x0 + 9 * slot + 3, y0 + slot + 3), (60, 60, 60), -1)
        for i, (r, g, b) in enumerate(HOTBAR_ITEM_RGB):
            cv2.rectangle(image, (x0 + i * slot + 10, y0 + 10), (x0 + i * slot + 30, y0 + 30), (b, g, r), -1)
        s = x0 + self.hotbar * slot
        cv2.rectangle(image, (s - 2, y0 - 2), (s + slot + 2, y0 + slot + 2), (255, 255, 255), 4)
        return image


# -----------------------------------------------------------------------------
# The scripted player: human-like bursts of walking, smooth turns, looking around, idling,
# jumping when blocked, digging, hotbar changes. Randomised per episode, deterministic per seed.

PAUSES = 0.15    # the share of new moves that are pauses: standing still, looking around, mining


class ScriptedPlayer:
    def __init__(self, seed):
        self.rng = r = np.random.default_rng(seed)
        # Per-episode temperament, so episodes differ in style as contractors do
        self.turn_speed = r.uniform(0.6, 1.8)     # multiplies how fast turns are made
        self.restless = r.uniform(0.3, 0.7)       # probability that a new move is a walk
        self.sprinter = r.uniform(0.0, 0.5)       # probability that a walk is a sprint
        self.moves, self.move_keys, self.look = 0, set(), []   # look: queued (dx, dy), one per tick
        self.attack_ticks, self.use_ticks = 0, 0
        self.last_pos, self.blocked, self.tick = None, 0, 0

    def new_move(self, world):
        r = self.rng
        if r.random() < PAUSES:
            self.pause(world)
            return
        kind = r.choice(["walk", "strafe", "back", "idle"], p=[self.restless, 0.15, 0.05, 0.8 - self.restless])
        keys = {"walk": {"w"}, "strafe": {r.choice(["a", "d"])}, "back": {"s"}, "idle": set()}[kind]
        if kind == "walk" and r.random() < self.sprinter:
            keys.add("left.control")
        if kind == "walk" and r.random() < 0.08:
            keys.add("left.shift")
        if kind == "walk" and r.random() < 0.2:
            keys.add(r.choice(["a", "d"]))
        self.move_keys, self.moves = keys, int(r.integers(5, 60 if kind == "walk" else 25))

    def pause(self, world):
        """Stand in one place, as players often do: perfectly still (hands off), looking around,
        or mining the block ahead; 1-5 s."""
        r = self.rng
        self.move_keys, self.moves = set(), int(r.integers(20, 100))
        kind = r.choice(["still", "look around", "mine"], p=[0.5, 0.3, 0.2])
        if kind == "still":
            self.look = [(0, 0)] * self.moves
        elif kind == "look around":
            gestures = []
            while len(gestures) < self.moves:
                self.new_look(world, "turn")
                gestures += self.look
            self.look = gestures[:self.moves]
        else:
            self.new_look(world, "dig")
            self.look += [(0, 0)] * (self.moves - len(self.look))
            self.attack_ticks = self.moves

    def new_look(self, world, kind=None):
        """Queue a smooth mouse gesture: a turn, a glance up or down, a dig, or a pause."""
        r = self.rng
        kind = kind or r.choice(["turn", "glance", "still", "dig"], p=[0.5, 0.2, 0.22, 0.08])
        ticks, yaw_turn, target_pitch = int(r.integers(6, 36)), 0.0, world.pitch
        if kind == "turn":
            yaw_turn = r.choice([-1, 1]) * r.uniform(15, 150) * self.turn_speed
            target_pitch = np.clip(world.pitch + r.normal(0, 10), -30, 45)
        elif kind == "glance":
            target_pitch, yaw_turn = r.uniform(-35, 55), r.normal(0, 10)
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
            self.new_move(world)
        if not self.look:
            self.new_look(world)
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
        # Never attack on the first tick: the converter would take it for the "attack stuck" quirk.
        buttons = {0} if self.attack_ticks > 0 and self.tick > 0 else set()
        if self.use_ticks > 0:
            buttons.add(1)
        self.attack_ticks, self.use_ticks, self.tick = self.attack_ticks - 1, self.use_ticks - 1, self.tick + 1
        return PlayerInput(keys={f"key.keyboard.{k}" for k in keys}, dx=dx, dy=dy, buttons=buttons, dwheel=dwheel)


def write_synthetic_episode(raw_dir, stem, seed, n_frames, partial_dir=None):
    """Play one episode in the built-in world and record it exactly like a VPT episode:
    <stem>.mp4 (640x360, 20 fps) and <stem>.jsonl. Files appear only when complete: they are
    written in partial_dir (default raw_dir), then renamed."""
    video_path, jsonl_path = os.path.join(raw_dir, stem + ".mp4"), os.path.join(raw_dir, stem + ".jsonl")
    if os.path.exists(video_path) and os.path.exists(jsonl_path):
        return
    world, player, previous = World(seed), ScriptedPlayer(seed), PlayerInput()
    tmp = os.path.join(partial_dir or raw_dir, f"{stem}.{os.getpid()}.tmp")
    tmp_video, tmp_jsonl = tmp + ".mp4", tmp + ".jsonl"
    writer = cv2.VideoWriter(tmp_video, cv2.VideoWriter_fourcc(*"mp4v"), FPS, VIDEO_SIZE)
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
    written = cv2.VideoCapture(tmp_video)   # a full disk truncates the video silently: count its frames
    frames_written = int(written.get(cv2.CAP_PROP_FRAME_COUNT)) if written.isOpened() else 0
    written.release()
    if frames_written < n_frames:
        for path in (tmp_video, tmp_jsonl):
            os.remove(path)
        raise OSError(f"{video_path}: recorded {frames_written} of {n_frames} frames (is the disk full?); nothing kept")
    os.replace(tmp_jsonl, jsonl_path)
    os.replace(tmp_video, video_path)   # the video last: a pair exists only once both are whole


def _synthetic_job(job):
    """Pool worker: play, record and convert one built-in-world episode."""
    raw_dir, out_dir, stem, seed, n_frames, res = job
    try:
        write_synthetic_episode(raw_dir, stem, seed, n_frames, os.path.join(out_dir, PARTIAL))
    except Exception as e:   # a full disk, say: reported, and the other episodes go on
        return None, f"{stem}: {type(e).__name__}: {e}"
    meta, problem = _convert_job((os.path.join(raw_dir, stem + ".mp4"), os.path.join(raw_dir, stem + ".jsonl"), out_dir, res))
    return meta, problem and f"{problem} (delete {os.path.join(raw_dir, stem)}.* to record it again)"


def make_synthetic(n_episodes, out_dir, res, n_frames, seed, workers, val_fraction, split_by="session"):
    """Write n episodes of the built-in world as VPT files under <out>/raw, converting each as soon
    as it is written, then write the index. Returns the number converted."""
    os.makedirs(os.path.join(out_dir, "raw"), exist_ok=True)
    # Stems shaped like VPT's <alias>-<12 hex session id>-<date>-<time>; one session each
    jobs = [(os.path.join(out_dir, "raw"), out_dir, f"builtin-{seed * 100_000 + i:012x}-20260101-000000", seed * 100_000 + i,
             n_frames, res) for i in range(n_episodes)]
    return run_jobs(_synthetic_job, jobs, "built-in world", out_dir, res, "builtin", workers,
                    (val_fraction, split_by))[0]


# -----------------------------------------------------------------------------
# Downloading VPT episodes: index -> N (mp4, jsonl) pairs, resumable, retried, verified

VPT_INDEX_URL = "https://openaipublic.blob.core.windows.net/minecraft-rl/snapshots/"
TIMEOUT = 15.0             # seconds to wait for the server before a request counts as failed
ATTEMPTS = 3               # tries per file before the episode counts as failed
FAILURES_TO_GIVE_UP = 2    # episodes failed in a row that stop the download: the server is gone


class DownloadError(Exception):
    pass


def check_url(url):
    """Only https, except plain http to this machine (the tests' loopback server)."""
    parsed = urllib.parse.urlparse(url)
    with contextlib.suppress(ValueError):
        if parsed.scheme == "http" and (parsed.hostname == "localhost" or ipaddress.ip_address(parsed.hostname).is_loopback):
            return url
    if parsed.scheme != "https":
        raise DownloadError(f"refusing {url}: only https URLs are downloaded (plain http only from this machine)")
    return url


def read_vpt_index(index, timeout=TIMEOUT):
    """(basedir, relpaths) of a VPT index: a local file, a URL, or the name of one of OpenAI's."""
    local = "://" not in index and (os.path.exists(index) or "/" in index or os.sep in index)
    source = index if local or "://" in index else VPT_INDEX_URL + index      # else the name of one of OpenAI's
    try:
        if local:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        else:
            with urllib.request.urlopen(check_url(source), timeout=timeout) as response:
                data = json.loads(response.read().decode("utf-8"))
        basedir, relpaths = data["basedir"], [str(path) for path in data["relpaths"]]
    except (OSError, urllib.error.URLError) as e:
        raise DownloadError(f"{source}: cannot be read ({describe(e)})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{source}: not a VPT index (expected JSON with 'basedir' and 'relpaths'): {e}") from None
    for relpath in relpaths:
        if relpath.startswith(("/", "\\")) or "://" in relpath or ".." in relpath.replace("\\", "/").split("/") \
                or not relpath.endswith(".mp4"):
            raise DownloadError(f"{source}: refusing unsafe or unexpected relpath {relpath!r} (absolute, '..' or not an .mp4)")
    return basedir.rstrip("/") + "/", relpaths


def download_file(url, path, timeout=TIMEOUT, attempts=ATTEMPTS, backoff=1.0):
    """Download url to path. Resumes a leftover path + '.part' with an HTTP Range request, waits
    at most `timeout` seconds for the server each time, retries with exponential backoff, and
    checks the size against Content-Length before the file gets its final name. Returns False
    if the server says the file does not exist."""
    check_url(url)
    part = path + ".part"
    for attempt in range(attempts):
        try:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                have = have if response.status == 206 else 0      # 200: the whole file, start over
                total = have + int(response.headers["Content-Length"]) if "Content-Length" in response.headers else None
                with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                    leave=False, desc=os.path.basename(path)) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and os.path.getsize(part) != total:
                raise DownloadError(f"got {os.path.getsize(part)} of {total} bytes")
            os.replace(part, path)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            if e.code == 416:                  # our .part is not a prefix the server knows
                os.remove(part)
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, DownloadError) as e:   # timeouts are OSErrors
            error = describe(e)
        if attempt + 1 < attempts:
            time.sleep(backoff * 2 ** attempt)
    raise DownloadError(f"{url}: failed {attempts} times ({error})")


def download_episodes(index, n, raw_dir, timeout=TIMEOUT):
    """Download the first n complete episodes of an index into raw_dir; files missing on the
    server are skipped, as some listed files are. Returns the number downloaded."""
    os.makedirs(raw_dir, exist_ok=True)
    have = len(find_episodes(raw_dir)[0]) if any(name.lower().endswith(".mp4") for name in os.listdir(raw_dir)) else 0
    if have >= n:                      # a rerun after a finished download asks the server nothing
        print(f"{raw_dir} holds {have} episodes already: nothing to download")
        return n
    basedir, relpaths = read_vpt_index(index, timeout)
    done, failed_in_a_row = 0, 0
    with tqdm(total=n, desc="download", unit="episode") as bar:
        for relpath in relpaths:
            if done == n:
                break
            stem = os.path.basename(relpath)[:-len(".mp4")]
            if all(os.path.exists(os.path.join(raw_dir, stem + ext)) for ext in (".jsonl", ".mp4")):
                done += 1                  # downloaded whole by an earlier run (files get their names last)
                bar.update(1)
                continue
            bar.set_postfix_str(f"waiting for {urllib.parse.urlparse(basedir).hostname} ({stem})")
            try:
                ok = all(download_file(basedir + relpath[:-len(".mp4")] + ext, os.path.join(raw_dir, stem + ext), timeout)
                         for ext in (".jsonl", ".mp4"))
                problem, failed_in_a_row = "not on the server", 0
            except DownloadError as e:
                ok, problem, failed_in_a_row = False, str(e), failed_in_a_row + 1
                if failed_in_a_row == FAILURES_TO_GIVE_UP:
                    raise DownloadError(f"{failed_in_a_row} episodes in a row failed (last: {e}); is the server "
                                        "reachable? Run the same command again to resume") from None
            done += ok
            bar.update(ok)
            if not ok:
                tqdm.write(f"skipped {stem}: {problem}")
    if done < n:
        print(f"only {done} of {n} episodes could be downloaded")
    return done


# -----------------------------------------------------------------------------
# Main

def describe(error, where=None):
    """An OSError as one line that names its file: '<file>: <what went wrong>' (`where`, the folder
    being written, when the error names no file: a full disk on a write, say)."""
    if isinstance(error, urllib.error.URLError) and isinstance(error.reason, OSError):
        error = error.reason
    if isinstance(error, TimeoutError) or "timed out" in str(error):
        return "no answer in time (timed out)"
    if isinstance(error, (FileExistsError, NotADirectoryError)) and error.filename:
        blocking = error.filename        # the file that stands where a folder must go, if any:
        while not os.path.isfile(blocking) and os.path.dirname(blocking) not in ("", blocking):
            blocking = os.path.dirname(blocking)         # up to the first folder, or to "/"
        if os.path.isfile(blocking):
            return f"{blocking}: is a file, but a folder is needed there"
    name = getattr(error, "filename", None) or where
    return f"{name}: {getattr(error, 'strerror', None) or error}" if name else str(error)


def at_least(low, kind=int, below=None):
    """An argparse type: a number >= low (and < below), else one line naming the rule."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (f" and below {below}" if below else "") + f", got {text}")
        return value
    return parse


def non_empty(text):
    """An argparse type: a path or name that is not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


SEEDS = 10 ** 9      # seeds are 0 .. SEEDS - 1: every seed derived from one stays in range


def one_line_warnings():
    """A library's warning as one line ("warning: ..."), without the source line it came from."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def main(argv=None):
    one_line_warnings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", type=at_least(1), metavar="N", help="write N built-in-world episodes and convert them")
    source.add_argument("--vpt", metavar="DIR", type=non_empty, help="convert a folder of <stem>.mp4 + <stem>.jsonl pairs")
    source.add_argument("--download", metavar="INDEX", type=non_empty,
                        help="a VPT index: file, URL or name like all_6xx_Jun_29.json")
    parser.add_argument("--n", type=at_least(1), default=10, help="episodes to download (with --download)")
    parser.add_argument("--out", type=non_empty, help="dataset folder (default data/builtin, or data/vpt for real data)")
    parser.add_argument("--res", type=int, default=64, choices=[64, 128, 224], help="frame size in pixels")
    parser.add_argument("--frames", type=at_least(10), default=300, help="frames per built-in-world episode (20 per second)")
    parser.add_argument("--seed", type=at_least(0, below=SEEDS), default=0,
                        help="built-in world: episode i uses seed*100000+i")
    parser.add_argument("--workers", type=at_least(1), default=2, help="processes (one episode each)")
    parser.add_argument("--val_fraction", type=at_least(0.001, float, below=1), default=0.1,
                        help="share of sessions held out for validation")
    parser.add_argument("--split", choices=["session", "episode"], default="session",
                        help="keep each recording session on one side (default), or split episode by episode")
    parser.add_argument("--timeout", type=at_least(0.1, float), default=TIMEOUT, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    out, started, download_failed = args.out or ("data/builtin" if args.synthetic else "data/vpt"), time.time(), None
    if args.vpt and not os.path.isdir(args.vpt):
        sys.exit(f"error: --vpt {args.vpt}: no such folder")
    try:
        with stop_on_signals() as stopped_by:
            os.makedirs(out, exist_ok=True)
            lock_folder(out, "convert.lock", "another run of prepare_data.py", "--out")   # before any download
            if args.synthetic:
                converted = make_synthetic(args.synthetic, out, args.res, args.frames, args.seed, args.workers,
                                           args.val_fraction, args.split)
            else:
                raw_dir = args.vpt or os.path.join(out, "raw")
                if args.download:
                    try:
                        download_episodes(args.download, args.n, raw_dir, args.timeout)
                    except DownloadError as e:      # convert what did arrive, then report the failure
                        download_failed = e
                        print(f"download stopped: {e}")
                if not os.path.isdir(raw_dir):
                    raise download_failed or DatasetError(f"{raw_dir}: no such folder")
                converted = convert_folder(raw_dir, out, args.res, "vpt", args.workers, args.val_fraction, args.split)[0]
    except (DatasetError, DownloadError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {describe(e, out)}")
    except KeyboardInterrupt:
        print("interrupted: finished episodes are kept; run the same command again to go on")
        sys.exit(128 + stopped_by[0] if stopped_by else 130)
    if not converted:
        sys.exit(f"error: no episode was converted into {out} (the messages above say why)")
    if download_failed:
        sys.exit(f"error: {converted} episodes are converted in {out}, but the download stopped: {download_failed}")
    print(f"done in {time.time() - started:.1f} s")


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP (a closed terminal) stop the run as Ctrl-C does: the workers end at once,
    finished episodes stay, and the exit code is 128 + the signal's number. Yields the signals seen."""
    seen, names = [], [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]   # Windows has no SIGHUP

    def stop(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = {name: signal.signal(getattr(signal, name), stop) for name in names}
    try:
        yield seen
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


if __name__ == "__main__":
    main()
