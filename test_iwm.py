"""Tests for the JEPA image world model project. Run: python -m pytest -q test_iwm.py

Each test name states the property it proves. Sections: data conversion (prepare_data.py),
downloading, the world model (iwm.py).
"""
import dataclasses
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref

import cv2
import numpy as np
import pytest

import prepare_data as pd

C = pd.COLUMN


def line(keys=(), buttons=(), new_buttons=(), dx=0, dy=0, hotbar=0, gui=False, **extra):
    """A VPT jsonl line with the given inputs (state fields filled in)."""
    return {"mouse": {"x": 640, "y": 360, "dx": dx, "dy": dy, "buttons": list(buttons),
                      "newButtons": list(new_buttons), "dwheel": 0},
            "keyboard": {"keys": list(keys), "newKeys": [], "chars": ""},
            "isGuiOpen": gui, "hotbar": hotbar, "yaw": 10.0, "pitch": 5.0,
            "xpos": 1.0, "ypos": 2.0, "zpos": 3.0, **extra}


def write_video(path, n_frames, size=pd.VIDEO_SIZE, fps=pd.FPS, value=lambda i: 0):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n_frames):
        writer.write(np.full((size[1], size[0], 3), value(i), np.uint8))
    writer.release()


def write_jsonl(path, lines):
    with open(path, "w") as f:
        for item in lines:
            f.write(json.dumps(item) + "\n")


# -----------------------------------------------------------------------------
# Action conversion, line by line (vpt-format.md)

def test_every_mapped_key_sets_its_minerl_column_and_other_keys_are_ignored():
    for key, name in pd.KEY_TO_ACTION.items():
        actions, _ = pd.actions_from_lines([line(keys=[key, "key.keyboard.z"])])
        assert actions[0, C[name]] == 1
        assert actions[0].sum() == 1, f"{key} set more than its own column"
    assert len(pd.KEY_TO_ACTION) == 20


def test_mouse_buttons_use_vpt_numbering_zero_is_attack():
    actions, _ = pd.actions_from_lines([line(buttons=[0]), line(buttons=[1]), line(buttons=[2]),
                                        line(buttons=[3, 7])])
    assert actions[0, C["attack"]] == 1 and actions[1, C["use"]] == 1 and actions[2, C["pickItem"]] == 1
    assert actions[3].sum() == 0          # buttons above 2 are ignored


def test_camera_is_float_degrees_so_small_moves_are_not_truncated():
    actions, _ = pd.actions_from_lines([line(dx=1, dy=-3), line(dx=2400)])
    assert actions[0, C["camera_yaw"]] == pytest.approx(0.15)
    assert actions[0, C["camera_pitch"]] == pytest.approx(-0.45)
    assert actions[1, C["camera_yaw"]] == pytest.approx(360.0)   # 2400 units = a full turn


def test_hotbar_change_sets_the_key_on_the_line_before_the_new_state():
    lines = [line(hotbar=0), line(hotbar=0), line(hotbar=3), line(hotbar=3)]
    actions, _ = pd.actions_from_lines(lines)
    hotbar = actions[:, [C[f"hotbar.{n}"] for n in range(1, 10)]]
    assert hotbar[1, 3] == 1              # action 1 caused the slot-3 state on line 2: hotbar.4
    assert hotbar.sum() == 1


def test_attack_stuck_at_start_is_released_until_attack_is_pressed_again():
    lines = [line(buttons=[0], new_buttons=[0]), line(buttons=[0]), line(buttons=[0, 1]),
             line(buttons=[0], new_buttons=[0]), line(buttons=[0])]
    actions, _ = pd.actions_from_lines(lines)
    assert actions[:, C["attack"]].tolist() == [0, 0, 0, 1, 1]
    assert actions[2, C["use"]] == 1      # only attack is affected
    normal, _ = pd.actions_from_lines([line(buttons=[0], new_buttons=[0, 1]), line(buttons=[0])])
    assert normal[:, C["attack"]].tolist() == [1, 1]


def test_null_mouse_or_keyboard_and_missing_fields_mean_no_input():
    lines = [{"mouse": None, "keyboard": None}, {"keyboard": {"keys": None}}, {}]
    actions, state = pd.actions_from_lines(lines)
    assert actions.shape == (3, len(pd.ACTION_COLUMNS)) and actions.sum() == 0
    assert state is None                  # no yaw/pitch/position recorded


def test_state_and_gui_flag_are_read_from_the_line():
    actions, state = pd.actions_from_lines([line(gui=True), line()])
    assert actions[:, C["gui_open"]].tolist() == [1, 0]
    assert state[0].tolist() == [10.0, 5.0, 1.0, 2.0, 3.0]


def test_the_crosshair_distance_is_recorded_by_the_builtin_world_and_kept_only_where_every_line_has_it():
    world = pd.World(0)
    world.pitch = 90.0                                       # straight down: the ground at the feet
    assert world.line(0, pd.PlayerInput())["crosshairDistance"] == pytest.approx(pd.EYE_HEIGHT, abs=1e-6)
    world.pitch = -90.0                                      # straight up: sky, as far as one can see
    assert world.crosshair_distance() == pd.VIEW_DISTANCE
    _, state = pd.actions_from_lines([line(crosshairDistance=2.5), line(crosshairDistance=7.0)])
    assert state[:, 5].tolist() == [2.5, 7.0]
    _, state = pd.actions_from_lines([line(crosshairDistance=2.5), line()])     # as VPT: no distance
    assert state.shape == (2, 5)


def test_builtin_world_input_round_trips_through_the_converter():
    inp = pd.PlayerInput(keys={"key.keyboard.w", "key.keyboard.3"}, dx=-7, dy=4, buttons={0})
    world = pd.World(0)
    actions, _ = pd.actions_from_lines([world.line(0, pd.PlayerInput()), world.line(1, inp)])
    back = pd.input_from_action(actions[1])
    assert (back.keys, back.dx, back.dy, back.buttons) == (inp.keys, inp.dx, inp.dy, inp.buttons)


# -----------------------------------------------------------------------------
# Reading episodes: frame/line pairing, cursor, bad input

def test_frame_i_is_paired_with_line_i_and_a_doubled_last_frame_is_dropped(tmp_path):
    lines = [line() for _ in range(10)]
    for n_frames in (10, 11):
        video = tmp_path / f"v{n_frames}.mp4"
        write_video(video, n_frames, value=lambda i: 20 * i)
        frames = pd.read_frames(video, lines, 64)
        assert frames.shape == (10, 64, 64, 3)
        np.testing.assert_allclose(frames.reshape(10, -1).mean(1), 20 * np.arange(10), atol=4)


@pytest.mark.parametrize("n_frames", [8, 12])
def test_a_frame_count_other_than_n_or_n_plus_one_is_an_error(tmp_path, n_frames):
    video = tmp_path / "v.mp4"
    write_video(video, n_frames)
    with pytest.raises(pd.EpisodeError, match="v.mp4.*frames for 10 action lines"):
        pd.read_frames(video, [line() for _ in range(10)], 64)


def test_cursor_is_drawn_only_on_gui_open_frames_where_the_mouse_is(tmp_path):
    video = tmp_path / "v.mp4"
    write_video(video, 2)
    # Window (640, 360) is the 1280x720 window's centre: the video's centre (320, 180)
    lines = [line(), line(gui=True)]
    frames = pd.read_frames(video, lines, 64)
    assert frames[0].max() < 30
    bright = np.argwhere(frames[1].max(axis=2) > 128)
    assert len(bright) > 0
    assert abs(bright[:, 0].mean() - 33) < 4 and abs(bright[:, 1].mean() - 33) < 4  # just below-right of centre


def make_bad_episodes(raw):
    """One good episode and one of each kind of bad input, in a raw folder."""
    good = [line() for _ in range(12)]
    write_video(raw / "good-000000000001-20200101-000000.mp4", 12)
    write_jsonl(raw / "good-000000000001-20200101-000000.jsonl", good)
    write_video(raw / "corrupt-000000000002-20200101-000000.mp4", 12)
    with open(raw / "corrupt-000000000002-20200101-000000.jsonl", "w") as f:
        f.write(json.dumps(good[0]) + "\n" + json.dumps(good[1])[:25] + "\n")   # truncated line
    write_video(raw / "count-000000000003-20200101-000000.mp4", 20)
    write_jsonl(raw / "count-000000000003-20200101-000000.jsonl", good)
    (raw / "garbage-000000000004-20200101-000000.mp4").write_bytes(b"not a video at all" * 100)
    write_jsonl(raw / "garbage-000000000004-20200101-000000.jsonl", good)
    write_video(raw / "small-000000000005-20200101-000000.mp4", 12, size=(320, 180))
    write_jsonl(raw / "small-000000000005-20200101-000000.jsonl", good)
    write_video(raw / "fps-000000000006-20200101-000000.mp4", 12, fps=30)
    write_jsonl(raw / "fps-000000000006-20200101-000000.jsonl", good)
    write_video(raw / "lonely-000000000007-20200101-000000.mp4", 12)   # no jsonl


def test_each_bad_episode_is_skipped_with_a_message_naming_its_file(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_bad_episodes(raw)
    converted, problems = pd.convert_folder(str(raw), str(tmp_path / "data"), 64, "vpt", workers=2)
    assert converted == 1
    expected = {"corrupt": "line 2 is not valid JSON", "count": "more than 13 frames for 12",
                "garbage": "cannot open", "small": "resolution 320x180",
                "fps": "30 fps", "lonely": "no matching"}
    for name, words in expected.items():
        matching = [p for p in problems if f"{name}-0000" in p]
        assert len(matching) == 1 and words in matching[0], (name, problems)
    assert "convert: 1 episodes in" in (out := capsys.readouterr().out) and "skipped 6" in out
    index, episodes = pd.load_dataset(str(tmp_path / "data"))
    assert [e["name"] for e in episodes] == ["good-000000000001-20200101-000000"]


# -----------------------------------------------------------------------------
# The dataset: split, memory mapping, resume

def test_split_is_by_session_deterministic_and_keeps_chunks_of_a_session_together():
    stems = [f"alias{i}-{i:012x}-20220101-{h:06d}" for i in range(200) for h in (0, 500, 1000)]
    splits = {s: pd.split_of(s, 0.1) for s in stems}
    assert splits == {s: pd.split_of(s, 0.1) for s in stems}
    for i in range(200):
        assert len({splits[s] for s in stems if s.startswith(f"alias{i}-")}) == 1
    val_sessions = sum(splits[f"alias{i}-{i:012x}-20220101-000000"] == "val" for i in range(200))
    assert 8 <= val_sessions <= 35


@pytest.fixture(scope="module")
def builtin_raw(tmp_path_factory):
    """Three short built-in-world episodes written as VPT files."""
    raw = tmp_path_factory.mktemp("raw")
    for i in range(3):
        pd.write_synthetic_episode(str(raw), f"builtin-{i:012x}-20260101-000000", i, 30)
    return raw


def test_builtin_episodes_are_written_like_vpt_and_convert_with_state(builtin_raw, tmp_path):
    stem = "builtin-000000000001-20260101-000000"
    lines = pd.read_jsonl(builtin_raw / f"{stem}.jsonl")
    assert len(lines) == 30
    for key in ["mouse", "keyboard", "isGuiOpen", "isGuiInventory", "hotbar", "yaw", "pitch",
                "xpos", "ypos", "zpos", "tick", "milli"]:
        assert key in lines[0]
    capture = cv2.VideoCapture(str(builtin_raw / f"{stem}.mp4"))
    assert (capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (640, 360)
    converted, problems = pd.convert_folder(str(builtin_raw), str(tmp_path), 64, "builtin")
    assert converted == 3 and not problems
    index, episodes = pd.load_dataset(str(tmp_path))
    assert index["action_columns"] == pd.ACTION_COLUMNS and index["resolution"] == 64
    assert {e["split"] for e in episodes} == {"train", "val"}
    episode = episodes[1]
    assert isinstance(episode["frames"], np.memmap) and episode["frames"].dtype == np.uint8
    assert episode["frames"].shape == (30, 64, 64, 3) and episode["actions"].dtype == np.float32
    # state on line i is before action i: the next line's yaw = this yaw + this camera_yaw
    yaw, turn = episode["state"][:, 0], episode["actions"][:, C["camera_yaw"]]
    np.testing.assert_allclose(yaw[1:], yaw[:-1] + turn[:-1], atol=1e-3)


def test_the_scripted_player_also_stands_still_and_mines_in_place_as_players_do():
    longest = {"still": 0, "mining": 0}
    for seed in range(6):                                    # several temperaments
        world, player, run = pd.World(seed), pd.ScriptedPlayer(seed), {"still": 0, "mining": 0}
        for _ in range(1200):
            inp = player.act(world)
            world.step(inp)
            in_place = not inp.keys and not inp.dx and not inp.dy
            run = {"still": run["still"] + 1 if in_place and not inp.buttons else 0,
                   "mining": run["mining"] + 1 if in_place and inp.buttons == {0} else 0}
            longest = {k: max(longest[k], run[k]) for k in run}
    assert longest["still"] >= 40 and longest["mining"] >= 20, longest    # 2 s hands off; 1 s of digging


def test_world_physics_walk_turn_and_gravity():
    world = pd.World(3)
    yaw = world.yaw
    world.step(pd.PlayerInput(dx=600))                     # 600 units = 90 degrees right
    assert world.yaw == pytest.approx(yaw + 90)
    world.pitch = 0
    world.step(pd.PlayerInput(dy=10_000))
    assert world.pitch == 90                               # clamped
    world.pos[1] += 3                                      # lift the player: gravity pulls back
    for _ in range(40):
        world.step(pd.PlayerInput())
    assert world.pos[1] == world.ground_at(world.pos[0], world.pos[2])
    moved = []
    for _ in range(20):
        before = world.pos.copy()
        world.step(pd.PlayerInput(keys={"key.keyboard.w"}))
        moved.append(np.linalg.norm((world.pos - before)[[0, 2]]))
    assert max(moved) == pytest.approx(pd.WALK, rel=1e-6)


def test_a_killed_conversion_resumes_and_never_leaves_a_loadable_half_episode(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "prepare_data.py", "--synthetic", "5", "--frames", "60",
           "--workers", "1", "--out", str(out)]
    here = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.Popen(cmd, cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("episodes/*/meta.json"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)   # the whole job, worker processes too
    process.wait()
    time.sleep(0.2)
    finished = {p.parent.name: p.stat().st_mtime for p in out.glob("episodes/*/meta.json")}
    assert 2 <= len(finished) < 5, "the run should be killed part way"
    # Whatever the kill left behind, nothing half-written is visible as an episode
    pd.write_index(str(out), 64, "builtin", 0.1)
    _, episodes = pd.load_dataset(str(out))
    assert {e["name"] for e in episodes} == set(finished)
    subprocess.run(cmd, cwd=here, check=True, capture_output=True)
    _, episodes = pd.load_dataset(str(out))
    assert len(episodes) == 5 and all(len(e["frames"]) == 60 for e in episodes)
    for name, mtime in finished.items():   # finished episodes were skipped, not redone
        assert (out / "episodes" / name / "meta.json").stat().st_mtime == mtime


# -----------------------------------------------------------------------------
# Downloading from a server on 127.0.0.1

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours 'Range: bytes=N-' (Python's own does not)."""
    ranges = []

    def log_message(self, *args):
        pass

    def send_head(self):
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not header or not os.path.isfile(path):
            return super().send_head()
        start = int(header.split("=")[1].split("-")[0])
        RangeHandler.ranges.append((os.path.basename(path), start))
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(size - start))
        self.end_headers()
        return f


@pytest.fixture
def loopback_server(builtin_raw, tmp_path):
    """Serves built-in-world episodes under data/6.13/ plus an index, on 127.0.0.1."""
    root = tmp_path / "www"
    (root / "data" / "6.13").mkdir(parents=True)
    stems = sorted(p.stem for p in builtin_raw.glob("*.mp4"))
    for stem in stems:
        for ext in (".mp4", ".jsonl"):
            shutil.copy(builtin_raw / (stem + ext), root / "data" / "6.13" / (stem + ext))
    handler = lambda *a, **k: RangeHandler(*a, directory=str(root), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    relpaths = ["data/6.13/missing-00000000000f-20220101-000000.mp4"] + [f"data/6.13/{s}.mp4" for s in stems]
    (root / "index.json").write_text(json.dumps({"basedir": base, "relpaths": relpaths}))
    RangeHandler.ranges = []
    yield base, root, stems
    server.shutdown()


def test_download_skips_missing_files_resumes_a_partial_file_and_converts(loopback_server, tmp_path):
    base, root, stems = loopback_server
    out = tmp_path / "data"
    raw = out / "raw"
    raw.mkdir(parents=True)
    original = (root / "data" / "6.13" / f"{stems[0]}.mp4").read_bytes()
    (raw / f"{stems[0]}.mp4.part").write_bytes(original[:1000])        # an interrupted download
    pd.main(["--download", base + "index.json", "--n", "2", "--out", str(out)])
    assert (raw / f"{stems[0]}.mp4").read_bytes() == original
    assert (f"{stems[0]}.mp4", 1000) in RangeHandler.ranges             # resumed, not restarted
    assert not (raw / f"{stems[2]}.mp4").exists()                       # only n episodes
    _, episodes = pd.load_dataset(str(out))
    assert sorted(e["name"] for e in episodes) == stems[:2]


def test_download_refuses_unsafe_relpaths_and_plain_http_to_other_hosts(tmp_path):
    for bad in ["/etc/passwd.mp4", "data/../../x.mp4", "http://evil/x.mp4"]:
        index = tmp_path / "index.json"
        index.write_text(json.dumps({"basedir": "https://example.org/", "relpaths": [bad]}))
        with pytest.raises(pd.DownloadError, match="unsafe"):
            pd.read_vpt_index(str(index))
    with pytest.raises(pd.DownloadError, match="only https"):
        pd.download_file("http://example.org/a.mp4", str(tmp_path / "a.mp4"))


# -----------------------------------------------------------------------------
# The world model (iwm.py)

import torch  # noqa: E402  (kept here so the data tests above read without it)

import iwm  # noqa: E402
import sample  # noqa: E402

A = len(pd.ACTION_COLUMNS)


def small_config(**overrides):
    """A model small enough to train in a second on CPU."""
    fields = dict(size="tiny", image_size=32, patch_size=8, width=32, heads=2, encoder_depth=1,
                  conditioner_depth=1, predictor_depth=1, frame_skip=2, rollout=2, batch_size=4,
                  steps=6, warmup_steps=2, eval_every=3, eval_windows=8, eval_horizon=4,
                  ckpt_every=3, dtype="float32", device="cpu")
    return iwm.Config(**{**fields, **overrides})


def randomize_head(model):
    """The predictor's head starts at zero (predict "no change"); give it weights so that
    its output depends on its input."""
    torch.nn.init.normal_(model.predictor.head.weight, std=0.1)


def test_shapes_through_every_module():
    cfg = small_config()
    model = iwm.WorldModel(cfg)
    B, N, D, K = 3, (32 // 8) ** 2, cfg.width, cfg.action_window
    frames = torch.randint(0, 256, (B, 3, 64, 64, 3), dtype=torch.uint8)
    actions = torch.randn(B, 2, K, A)
    assert iwm.normalize_frames(frames, 32).shape == (B, 3, 3, 32, 32)
    latents = model.encode(frames)
    assert latents.shape == (B, 3, N, D)
    assert model.encode_target(frames).shape == (B, 3, N, D)
    conditioned = model.action_conditioner(latents[:, 0], actions[:, 0])
    assert conditioned.shape == (B, N, D)
    assert model.predictor(conditioned, latents[:, 0]).shape == (B, N, D)
    assert model.rollout(latents[:, 0], actions).shape == (B, 2, N, D)
    loss, info = model(frames, actions, frames[:, 0])
    assert loss.shape == () and info["world_loss"].shape == info["decoder_loss"].shape == ()


def test_most_of_the_decoders_batch_learns_on_the_exact_latent_the_rest_on_a_noised_one_it_is_told():
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    seen = []                                              # what the decoder is given, per call
    model.decoder.forward = lambda noisy, t, latent, context, noise: seen.append((latent, noise)) or noisy
    B = 256
    frames = torch.randint(0, 256, (B, 3, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        model(frames, torch.rand(B, 2, 25, A), frames[:, 0])
        target = model.encode_target(frames[:, 1:2])[:, 0]
    latent, noise = seen[0]
    exact = noise == 0
    assert abs(exact.float().mean().item() - (1 - iwm.NOISED_SHARE)) < 0.08
    torch.testing.assert_close(latent[exact], target[exact])               # exact: the target itself
    told = noise[~exact]                                                   # noised: by what it is told
    assert 0 < told.min() and told.max() <= iwm.MAX_LATENT_NOISE and abs(told.mean() - 0.5) < 0.1
    spread = (latent[~exact] - target[~exact]).std(dim=(1, 2))
    torch.testing.assert_close(spread, told, rtol=0.1, atol=0.01)


def test_base_preset_matches_the_original_parameter_counts_within_5_percent():
    cfg = iwm.Config(**{**iwm.PRESETS["base"], "size": "base"})
    with torch.device("meta"):                 # no memory is allocated for 370M parameters
        model = iwm.WorldModel(cfg)
    counts = iwm.count_parameters(model)
    for part, original in [("encoder", 114e6), ("action_conditioner", 43e6), ("predictor", 213e6),
                           ("decoder", 141e6)]:
        assert abs(counts[part] - original) / original < 0.05, (part, counts[part])


def test_the_order_of_the_25_actions_matters():
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    randomize_head(model)
    latent = torch.randn(2, 16, 32)
    actions = torch.rand(2, 25, A)
    permuted = actions[:, torch.randperm(25)]
    assert not torch.allclose(model.action_conditioner(latent, actions),
                              model.action_conditioner(latent, permuted), atol=1e-5)
    assert not torch.allclose(model.predict_next(latent, actions), model.predict_next(latent, permuted), atol=1e-5)


def test_target_encoder_gets_no_gradient_and_follows_the_ema_formula():
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    model.train()
    assert not model.target_encoder.training          # always eval mode
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    model(frames, torch.rand(2, 2, 25, A), frames[:, 0])[0].backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert any(p.grad is not None for p in model.encoder.parameters())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for old, new, online in zip(before, model.target_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    cfg = small_config(steps=100)
    assert iwm.ema_momentum(0, cfg) == 0.996 and iwm.ema_momentum(100, cfg) == 1.0
    assert iwm.ema_momentum(50, cfg) == pytest.approx(0.998)


def test_loss_is_per_token_and_reduces_over_features():
    target = torch.randn(2, 5, 8)
    predicted = target.clone()
    predicted[1, 3] += 2.0                              # one token wrong by 2 in every feature
    per_token = iwm.jepa_loss(predicted, target)
    assert per_token.shape == (2, 5)
    expected = torch.zeros(2, 5)
    expected[1, 3] = 4.0
    torch.testing.assert_close(per_token, expected)


def test_action_window_pads_the_episode_start_and_never_wraps():
    actions = np.arange(1, 11, dtype=np.float32)[:, None].repeat(A, axis=1)   # rows 1..10
    window = iwm.action_window(actions, end=3, window=25)
    assert window.shape == (25, A)
    assert (window[:22] == 0).all()                     # "no action" before the start
    assert window[22:, 0].tolist() == [1, 2, 3]         # the last row is the action before frame 3
    assert 10 not in window                             # nothing from the episode's end
    assert iwm.action_window(actions, end=10, window=4)[:, 0].tolist() == [7, 8, 9, 10]


def test_camera_scaling_keeps_small_and_large_moves_order_one():
    actions = torch.zeros(3, A)
    actions[:, pd.COLUMN["camera_yaw"]] = torch.tensor([0.15, 5.0, 90.0])
    actions[:, pd.COLUMN["forward"]] = 1
    scaled = iwm.scale_actions(actions)
    yaw = scaled[:, pd.COLUMN["camera_yaw"]]
    assert 0.05 < yaw[0] < 0.1 and 1 < yaw[1] < 2 and 4 < yaw[2] < 5
    assert (scaled[:, pd.COLUMN["forward"]] == 1).all()


def test_the_untrained_predictor_says_nothing_changes_from_the_start_frames_target_latent():
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    latent, target = torch.randn(2, 3, 16, 32)
    rollout = model.rollout(latent, torch.randn(3, 4, 25, A), target)
    for step in range(4):                                           # every step: the copy baseline
        torch.testing.assert_close(rollout[:, step], target)


def test_window_weights_let_small_changes_count_and_survive_a_batch_that_never_moves():
    change = torch.tensor([0.0, 0.01, 0.1, 1.0])                    # standing, walking, turning, a flick
    weights = iwm.window_weights(change)
    assert torch.all(weights[:-1] > weights[1:]) and weights.mean() == pytest.approx(1.0)
    assert weights[0] / weights[-1] < 10                           # bounded: standing is not infinitely heavy
    torch.testing.assert_close(iwm.window_weights(torch.zeros(4)), torch.ones(4))


def test_teacher_forced_steps_start_from_the_true_target_latents():
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config(rollout=3))
    torch.nn.init.normal_(model.predictor.head.weight, std=0.5)        # a predictor that changes its input
    frames, actions = torch.randint(0, 256, (4, 4, 32, 32, 3), dtype=torch.uint8), torch.rand(4, 3, 25, A)
    torch.manual_seed(1)                                          # the decoder's draws: not compared here
    _, info = model(frames, actions, frames[:, 0])
    with torch.no_grad():
        targets = model.encode_target(frames)                                       # (B, 4, N, D)
        open_loop = model.rollout(model.encode(frames[:, :1])[:, 0], actions, targets[:, 0])
        change = iwm.jepa_loss(targets[:, :1], targets[:, 1:]).mean(dim=(1, 2))

        def world_loss(starts):                  # 3 open-loop errors, then 2 one-step errors from `starts`
            forced = torch.stack([model.predict_next(starts[:, k], actions[:, k + 1]) for k in range(2)], dim=1)
            errors = torch.cat([iwm.jepa_loss(open_loop, targets[:, 1:]), iwm.jepa_loss(forced, targets[:, 2:])], dim=1)
            return (errors.mean(dim=(1, 2)) * iwm.window_weights(change)).mean()

    assert info["world_loss"].item() == pytest.approx(world_loss(targets[:, 1:3]).item(), rel=1e-5)
    assert abs(world_loss(open_loop[:, :2]).item() - info["world_loss"].item()) > 1e-4   # not from its own predictions


def test_sharpness_falls_with_blur_and_rises_with_a_patch_mosaic():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 68, 68, generator=g) * 2 - 1, 5, stride=1)  # (1, 3, 64, 64)
    detail = smooth + 0.3 * torch.randn(1, 3, 64, 64, generator=g)
    blurred = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(detail, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mosaic = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, scale_factor=8, mode="nearest")
    assert iwm.sharpness(blurred) < 0.5 * iwm.sharpness(detail)
    assert iwm.sharpness(mosaic + smooth) > 1.2 * iwm.sharpness(smooth)
    torch.testing.assert_close(iwm.sharpness(torch.stack([detail, blurred]))[:, 0],     # one value per image
                               torch.cat([iwm.sharpness(detail), iwm.sharpness(blurred)]))


def test_the_patch_grid_is_about_1_for_texture_and_high_for_a_mosaic_of_tiles():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1                     # no grid anywhere
    tiles = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, scale_factor=8)
    grid = iwm.patch_grid(torch.stack([noise, 0.5 * noise + tiles]), 8)        # (2 images, 2)
    assert grid.shape == (2, 2)
    assert 0.9 < grid[0].min() and grid[0].max() < 1.1
    assert (grid[1] > 2).all()
    shifted = (0.5 * noise + tiles).roll(4, dims=-1).roll(4, dims=-2)           # tiles off the 8-px grid
    assert (iwm.patch_grid(shifted, 8) < 0.8 * grid[1]).all()
    assert (iwm.patch_grid(torch.zeros(1, 3, 16, 16), 8) == 0).all()            # flat: no steps, no grid


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = small_config(width=64, heads=4)
    model = iwm.WorldModel(cfg)
    frames = torch.randint(0, 256, (4, 3, 32, 32, 3), dtype=torch.uint8)
    actions = torch.rand(4, 2, 25, A)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss, info = model(frames, actions, frames[:, 0])   # the target encoder stays fixed (momentum 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(info["world_loss"].item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


@pytest.fixture(scope="module")
def builtin_dataset(builtin_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    pd.convert_folder(str(builtin_raw), str(out), 64, "builtin")
    return str(out)


def sample_then_ctrl_c_in_step(step, signum=signal.SIGINT):
    """A WindowSampler.sample that sends this process Ctrl-C (SIGINT, or another signal) while
    sampling the batch of training step `step` (its first two calls sample the validation windows
    and the training windows the latent error is measured on)."""
    original, calls = iwm.WindowSampler.sample, []

    def sample(self, *args):
        calls.append(1)
        if len(calls) == step + 2:
            os.kill(os.getpid(), signum)
        return original(self, *args)

    return sample


def test_training_logs_metrics_and_a_run_interrupted_by_ctrl_c_resumes_exactly(builtin_dataset, tmp_path):
    straight = small_config(data=builtin_dataset, out_dir=str(tmp_path / "a"))
    _, metrics = iwm.fit(straight)
    assert len(metrics["pred_copy"]) == 4 and metrics["action_sensitivity"] > 0 and metrics["target_std"] > 0
    log = [json.loads(l) for l in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and "pred_copy" in log[2]
    # Ctrl-C during step 4 of run b: the step finishes, the run saves and exits
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(iwm.WindowSampler, "sample", sample_then_ctrl_c_in_step(4))
        with pytest.raises(SystemExit):
            iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path / "b")))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 4
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path / "b"), resume=True))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key   # target encoder included


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(builtin_dataset, tmp_path, monkeypatch):
    cfg = small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3)
    iwm.fit(cfg)
    good = (tmp_path / "ckpt.pt").read_bytes()
    monkeypatch.setattr(iwm, "jepa_loss", lambda p, t: (p - t).mean(-1) * float("nan"))
    with pytest.raises(FloatingPointError, match="last good state"):
        iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=6, resume=True))
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_a_corrupt_or_mismatched_checkpoint_gives_a_clear_error(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    path = tmp_path / "ckpt.pt"
    with pytest.raises(iwm.CheckpointError, match="different model.*width: checkpoint 32 vs requested 64"):
        iwm.parse_config(["--out_dir", str(tmp_path), "--resume", "--width", "64"])
    model = iwm.WorldModel(small_config(width=64, heads=2))
    with pytest.raises(iwm.CheckpointError, match="does not fit this model"):
        iwm.load_model_state(model, iwm.load_checkpoint(str(path)), str(path))
    state = iwm.load_checkpoint(str(path))
    del state["model"]["residual_rms"]                   # written before the residual sampler
    with pytest.raises(iwm.CheckpointError, match="does not fit this model.*residual_rms"):
        iwm.load_model_state(iwm.WorldModel(small_config()), state, str(path))
    path.write_bytes(path.read_bytes()[:5000])          # truncated, as by a full disk
    with pytest.raises(iwm.CheckpointError, match="cannot be read as a checkpoint"):
        iwm.load_checkpoint(str(path))
    path.write_text("not a checkpoint\n")
    with pytest.raises(iwm.CheckpointError, match="cannot be read") as error:
        iwm.load_checkpoint(str(path))
    assert "weights_only" not in str(error.value)          # torch's advice to unpickle anything is not ours to give
    with pytest.raises(iwm.CheckpointError, match="no checkpoint there"):
        iwm.load_checkpoint(str(tmp_path / "nothing.pt"))


def test_flags_override_the_preset_and_resume_keeps_the_checkpoint_config(builtin_dataset, tmp_path):
    cfg = iwm.parse_config(["--size", "small", "--steps", "7", "--lr", "0.01"])
    assert (cfg.width, cfg.steps, cfg.lr) == (256, 7, 0.01)
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    resumed = iwm.parse_config(["--out_dir", str(tmp_path), "--resume", "--steps", "9"])
    assert (resumed.width, resumed.steps, resumed.data) == (32, 9, builtin_dataset)


# -----------------------------------------------------------------------------
# The diffusion decoder and sample.py


def randomize_zero_inits(module):
    """adaLN-Zero and the output layer start at zero (the decoder starts as a constant); give
    them weights so that outputs depend on inputs."""
    for p in module.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)


def test_decoder_draws_each_latent_token_into_its_own_patch():
    torch.manual_seed(0)
    cfg = small_config()
    decoder = iwm.Decoder(cfg)
    randomize_zero_inits(decoder)
    noisy, t, latent = torch.randn(1, 3, 32, 32), torch.full((1,), 0.5), torch.randn(1, 16, 32)
    context, noise = torch.rand(1, 3, 32, 32) * 2 - 1, torch.full((1,), 0.3)
    base = decoder(noisy, t, latent, context, noise)
    assert base.shape == (1, 3, 32, 32)
    for token in [0, 5, 10, 15]:
        changed = latent.clone()
        changed[0, token] += 3.0
        change_per_patch = decoder.patchify(decoder(noisy, t, changed, context, noise) - base).abs().sum(-1)[0]
        assert change_per_patch.argmax() == token      # patch 5 = row 1, column 1 of the 4x4 grid
        other_context = context.clone()                # the context frame's patch i also lands in patch i
        other_context[0, :, (token // 4) * 8:(token // 4 + 1) * 8, (token % 4) * 8:(token % 4 + 1) * 8] *= -1
        change_per_patch = decoder.patchify(decoder(noisy, t, latent, other_context, noise) - base).abs().sum(-1)[0]
        assert change_per_patch.argmax() == token
    assert not torch.allclose(decoder(noisy, t, latent, context, noise + 0.5), base)   # it is told the noise level
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(decoder.patchify(images)[0, 5].reshape(3, 8, 8), images[0, :, 8:16, 8:16])


def test_the_decoders_windows_blend_back_into_the_picture_and_leave_no_seam_at_patch_borders():
    decoder = iwm.Decoder(small_config())                       # 32 px, 8-px patches: 4 x 4 tokens
    images = torch.randn(2, 3, 32, 32)
    windows = torch.nn.functional.unfold(images, 16, stride=8, padding=4).transpose(1, 2)   # (2, 16, 768)
    torch.testing.assert_close(decoder.overlap_add(windows), images)   # each 16-px window centred on its patch
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(2, 16, 3, 1, generator=g).expand(-1, -1, -1, 256).flatten(2)   # one colour per token
    blended = decoder.overlap_add(colours)
    tiles = torch.nn.functional.interpolate(colours[..., ::256].transpose(1, 2).unflatten(2, (4, 4)), scale_factor=8)
    assert (iwm.patch_grid(tiles, 8) > 5).all()                 # drawn patch by patch: a mosaic of tiles
    assert (iwm.patch_grid(blended, 8) < 2).all()               # blended: steps at the borders as elsewhere


def test_noising_and_sampler_are_consistent_a_perfect_denoiser_recovers_the_target():
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, t = torch.randn_like(x0), 0.7
    x_t = (1 - t) * x0 + t * noise                       # the noising process
    torch.testing.assert_close(x_t - t * (noise - x0), x0)   # one Euler step of size t along v
    for x0 in (x0, torch.randn(4, 16, 32)):              # pictures, and latent tokens
        perfect = lambda x, t: x0                                             # noqa: E731
        for steps in (1, 4, 10):
            torch.testing.assert_close(iwm.rectified_flow_sample(perfect, x0.shape, steps), x0, atol=1e-5, rtol=1e-5)
        assert torch.equal(iwm.rectified_flow_loss(perfect, x0), torch.zeros(4))
        assert (iwm.rectified_flow_loss(lambda x, t: x0 + 0.1, x0) > 0).all()


def model_and_one_step():
    """A small world model with a trained-looking predictor head, a latent, actions and the mean."""
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    randomize_head(model)
    latent, actions = torch.randn(3, 16, 32), torch.randn(3, 25, A)
    return model, latent, actions, model.predict_next(latent, actions)


def test_the_samplers_residual_at_t_1_is_0_so_its_first_step_is_the_mean_below_it_reads_the_noise():
    model, latent, actions, mean = model_and_one_step()
    conditioned = model.action_conditioner(latent, actions)
    zero = torch.zeros_like(latent)
    for noisy in (torch.randn_like(latent), zero):                          # whatever the noise
        torch.testing.assert_close(model.sampler(conditioned, mean, noisy, torch.ones(3)), zero)
    assert not torch.allclose(model.sampler(conditioned, mean, noisy, torch.full((3,), 0.5)), zero)
    seeded = lambda: torch.Generator().manual_seed(1)                       # noqa: E731
    one = model.predict_next(latent, actions, euler_steps=4, generator=seeded())
    assert torch.equal(one, model.predict_next(latent, actions, euler_steps=4, generator=seeded()))
    assert not torch.allclose(one, mean) and not torch.allclose(one, model.predict_next(latent, actions, euler_steps=4))
    torch.testing.assert_close(model.predict_next(latent, actions, euler_steps=1, generator=seeded()), mean)
    assert model.rollout(latent, torch.randn(3, 5, 25, A), euler_steps=2).shape == (3, 5, 16, 32)


def test_the_sampler_draws_the_residual_around_the_mean_at_the_running_rms_of_the_training_residuals():
    model, latent, actions, mean = model_and_one_step()
    draw = lambda: model.predict_next(latent, actions, euler_steps=3, generator=torch.Generator().manual_seed(1))  # noqa: E731
    residual = draw() - mean
    model.residual_rms.fill_(2.5)
    torch.testing.assert_close(draw() - mean, 2.5 * residual)               # the same draw, scaled
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    batch = frames, torch.rand(2, 2, 25, A), frames[:, 0]
    model.eval()
    model(*batch)
    assert model.residual_rms == 2.5                                         # evaluation leaves it
    model.train()
    for _ in range(600):                                                      # 0.99^600: the start is forgotten
        with torch.no_grad():
            model(*batch)
    with torch.no_grad():
        targets = model.encode_target(frames)
        start = model.encode(frames[:, :1])[:, 0]
        first = model.predict_next(start, batch[1][:, 0], targets[:, 0])
    rms = (targets[:, 1] - first).pow(2).mean().sqrt()
    torch.testing.assert_close(model.residual_rms, rms, rtol=0.01, atol=0)


def test_the_sampler_learns_from_detached_inputs_it_shapes_neither_the_latents_nor_the_mean(monkeypatch):
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    randomize_head(model)
    monkeypatch.setattr(iwm, "jepa_loss", lambda p, t: (p - t).pow(2).mean(-1) * 0.0)   # the mean's loss off
    model.decoder.requires_grad_(False)
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    loss, parts = model(frames, torch.rand(2, 2, 25, A), frames[:, 0])
    loss.backward()
    for part in (model.encoder, model.action_conditioner, model.predictor):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    assert model.sampler.noisy_in.weight.grad.any() and parts["flow_loss"] > 0


def test_a_decoder_that_keeps_the_context_draws_it_exactly():
    decoder = iwm.Decoder(small_config())
    pixels = decoder.patch_out.bias.shape[0] // 2
    with torch.no_grad():
        decoder.patch_out.bias[pixels:] = 30.0                               # keep every context pixel
    context = torch.rand(2, 3, 32, 32) * 2 - 1
    drawn = decoder.draw(torch.randn(2, 16, 32), context, torch.zeros(2), 4)
    torch.testing.assert_close(drawn, context, atol=1e-5, rtol=0)            # nothing changes: pixels pass through


def test_evaluate_scores_sampled_futures_and_the_windows_where_nothing_changed():
    torch.manual_seed(0)
    cfg = small_config()
    model = iwm.WorldModel(cfg)
    randomize_head(model)
    randomize_zero_inits(model.decoder)
    frames = torch.randint(0, 256, (4, 5, 32, 32, 3), dtype=torch.uint8)
    frames[:2, 1:3] = frames[:2, :1]                                         # two windows still for 2 steps
    mean_rollout = model.rollout                                             # an unbiased sampler: mean + noise
    model.rollout = lambda latent, actions, base=None, euler_steps=0, generator=None: (
        mean_rollout(latent, actions, base) + (0.3 * torch.randn(*actions.shape[:2], *latent.shape[1:])
                                                if euler_steps else 0))
    model.latent_error.fill_(0.3)
    told, draw = [], model.decoder.draw                                      # the noise each drawing is told
    model.decoder.draw = lambda latent, context, noise, *rest: told.append(noise) or draw(latent, context, noise, *rest)
    metrics = iwm.evaluate(model, frames, torch.randn(4, 4, cfg.action_window, A), torch.device("cpu"),
                           iwm.autocast_to("cpu", torch.float32), psnr_windows=4, euler_steps=2, futures=16)
    # told the predictor's error: the mean, under shuffled inputs, 4 futures, one under shuffled inputs;
    # told 0: the reconstruction (the true latents) alone
    assert sorted(bool(noise.any()) for noise in told) == [False] + [True] * 7
    assert metrics["still_windows"] == [2, 2, 0, 0] and metrics["psnr_still"][2:] == [None, None]
    assert all(math.isfinite(v) for v in metrics["psnr_still"][:2] + metrics["controllability_sample"])
    assert all(best >= one for best, one in zip(metrics["psnr_best_sample"], metrics["psnr_sample"]))
    assert metrics["gap_1"] / 5 < metrics["gap_4"] < metrics["gap_1"] / 3      # about 1/K: averages of more
    assert metrics["gap_4"] / 5 < metrics["gap_16"] < metrics["gap_4"] / 3     # come closer to the mean
    assert "where the view has not changed: PSNR dB h=1..:" in iwm.format_eval(1, metrics)


def test_sampler_is_deterministic_with_a_seed():
    torch.manual_seed(0)
    decoder = iwm.Decoder(small_config())
    randomize_zero_inits(decoder)
    latent, context = torch.randn(2, 16, 32), torch.rand(2, 3, 32, 32) * 2 - 1
    draw = lambda seed: decoder.draw(latent, context, torch.zeros(2), 3, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_the_decoders_context_frame_lies_1_to_context_gap_steps_before_the_frame_it_draws():
    frames = np.arange(200, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)   # frame i is i
    episode = {"frames": frames, "actions": np.zeros((200, A), np.float32)}
    cfg = small_config(frame_skip=2, context_gap=16)
    batch, _, context = iwm.WindowSampler([episode], 2, cfg).sample(2000, torch.Generator().manual_seed(0))
    gap_frames = batch[:, 1, 0, 0, 0].int() - context[:, 0, 0, 0].int()      # frame 1's index - the context's
    away_from_start = batch[:, 1, 0, 0, 0] >= 2 * 16
    assert set(gap_frames[away_from_start].tolist()) == set(range(2, 2 * 16 + 1, 2))   # 1..16 steps, all of them
    assert (gap_frames >= 0).all() and (context[:, 0, 0, 0] >= 0).all()               # never before the start


def test_ssim_is_one_for_identical_images_and_falls_with_blur_and_noise():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 68, 68, generator=g) * 2 - 1, 5, stride=1)   # (2, 3, 64, 64)
    blurred = torch.nn.functional.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    noisy = image + 0.3 * torch.randn(image.shape, generator=g)
    torch.testing.assert_close(iwm.ssim(image, image), torch.ones(2))
    assert (iwm.ssim(blurred, image) < 0.95).all() and (iwm.ssim(noisy, image) < iwm.ssim(blurred, image)).all()
    assert iwm.ssim(torch.stack([image, noisy]), torch.stack([image, image])).shape == (2, 2)


def test_the_predictors_latent_error_is_measured_saved_and_sets_the_decoders_trust(builtin_dataset, tmp_path):
    model, metrics = iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3, eval_psnr_windows=2))
    error = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]["latent_error"]
    assert error.shape == (iwm.MEASURED_STEPS,) and (error > 0).all()
    assert {"ssim_prediction", "ssim_repeat_start", "controllability"} <= metrics.keys()
    seen = []
    original = model.decoder.draw
    model.decoder.draw = lambda latent, context, noise, *rest: seen.append(noise) or original(latent, context, noise, *rest)
    frames = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    iwm.draw_rollout(model, torch.randn(1, 20, 16, 32), frames, True, 1)
    iwm.draw_rollout(model, torch.randn(1, 3, 16, 32), frames, False, 1)
    torch.testing.assert_close(seen[0], torch.cat([error, error[-1:].expand(4)]))   # step 17 on: the last one's
    assert not seen[1].any()                                                       # a true latent: no noise


def test_the_imagination_probes_control_reads_the_inputs_of_exactly_those_steps():
    cfg = small_config()
    model = iwm.WorldModel(cfg).eval()
    n = 40
    actions = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, A), np.float32)   # row i holds i
    episode = {"frames": np.zeros((n, 32, 32, 3), np.uint8), "actions": actions,
               "state": np.zeros((n, 5))}
    features, targets = sample.imagination_data(model, cfg, [episode], every=5)
    k = max(sample.IMAGINED_STEPS)
    inputs = features["inputs", k][:, -k * cfg.frame_skip * A:].view(-1, k * cfg.frame_skip, A)
    starts = torch.arange(0, n - k * cfg.frame_skip, 5)
    expected = starts[:, None] + torch.arange(k * cfg.frame_skip)    # rows t .. t + k*skip - 1
    torch.testing.assert_close(inputs[:, :, 0], expected.float())
    assert len(targets[k]) == len(starts)


def test_no_decoder_gradient_reaches_the_world_model(monkeypatch):
    torch.manual_seed(0)
    model = iwm.WorldModel(small_config())
    randomize_head(model)
    randomize_zero_inits(model.decoder)
    monkeypatch.setattr(iwm, "jepa_loss", lambda p, t: (p - t).pow(2).mean(-1) * 0.0)  # decoder loss only
    flow = iwm.rectified_flow_loss                                          # (the latents' flow off too)
    monkeypatch.setattr(iwm, "rectified_flow_loss", lambda f, x0: flow(f, x0) * (0.0 if x0.dim() == 3 else 1.0))
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    loss, _ = model(frames, torch.rand(2, 2, 25, A), frames[:, 0])
    loss.backward()
    for part in (model.encoder, model.action_conditioner, model.predictor):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.decoder.parameters())


def test_sample_py_writes_gifs_opencv_reads_back_with_the_panel_layout(builtin_dataset, tmp_path, capsys):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    ckpt = str(tmp_path / "ckpt.pt")
    common = ["--ckpt", ckpt, "--horizon", "4", "--n", "1", "--windows", "4", "--euler_steps", "2", "--scale", "2"]
    sample.main(common + ["--out", str(tmp_path / "a")])
    ok, gif = cv2.imreadanimation(str(tmp_path / "a" / "rollout_0.gif"))
    assert ok and len(gif.frames) == 4 + 1                                   # the start + 4 steps
    panel = 32 * 2
    assert gif.frames[0].shape == (sample.LABEL_HEIGHT + panel + sample.BAR_HEIGHT, 4 * panel + 3 * 2, 3)  # truth |
    table = json.load(open(tmp_path / "a" / "metrics.json"))["per_horizon"]                   # sampled | mean | recon
    assert [row["h"] for row in table] == [1, 2, 3, 4] and all(row["psnr_repeat_start"] > 0 for row in table)
    assert all(row["psnr_best_sample"] >= row["psnr_sample"] for row in table)
    assert "best of 4" in capsys.readouterr().out
    # "what if": the same start under two scripts, one panel each after the true future and the mean
    sample.main(common + ["--out", str(tmp_path / "b"), "--actions", "turn_left, walk_forward"])   # a space is fine
    ok, gif = cv2.imreadanimation(str(tmp_path / "b" / "rollout_0_turn_left_walk_forward.gif"))
    assert ok and gif.frames[0].shape[1] == 4 * panel + 3 * 2
    sample.main(common + ["--out", str(tmp_path / "c"), "--futures", "3"])   # truth | 3 futures | how they differ
    ok, gif = cv2.imreadanimation(str(tmp_path / "c" / "futures_0.gif"))
    assert ok and gif.frames[0].shape[1] == 5 * panel + 4 * 2
    with pytest.raises(SystemExit):
        sample.main(common + ["--actions", "moonwalk"])
    assert "unknown script 'moonwalk'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no checkpoint there"):
        sample.main(["--ckpt", str(tmp_path / "missing.pt")])


def test_sample_py_converts_a_raw_vpt_pair_on_the_fly(builtin_raw, builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    video = str(builtin_raw / "builtin-000000000002-20260101-000000.mp4")
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--video", video, "--horizon", "4", "--n", "1",
                 "--windows", "2", "--euler_steps", "2", "--out", str(tmp_path / "v")])
    assert (tmp_path / "v" / "rollout_0.gif").exists()


# -----------------------------------------------------------------------------
# Probes, surprise and planning


def test_cem_finds_the_minimum_of_a_known_cost_and_respects_the_box():
    target = torch.tensor([[0.3, -0.7], [1.5, 0.2], [-0.4, 0.9]])     # one entry outside the box
    low, high = torch.full((2,), -1.0), torch.full((2,), 1.0)

    def cost(x):
        return (x - target).pow(2).sum(dim=(1, 2))

    best, best_cost = sample.cem(cost, torch.zeros(3, 2), torch.ones(3, 2), low, high, iterations=12,
                              population=200, elites=20, generator=torch.Generator().manual_seed(0))
    optimum = target.clamp(-1, 1)                                        # the best point in the box
    assert torch.allclose(best, optimum, atol=0.03), best
    assert best_cost == pytest.approx(0.25, abs=0.01)                    # (1.5 - 1)^2 is unavoidable


def test_cem_returns_its_best_sample_not_a_mean_between_two_optima():
    def cost(x):                                  # two equally good plans: all +1 or all -1
        return torch.minimum((x - 1).pow(2).sum(dim=(1, 2)), (x + 1).pow(2).sum(dim=(1, 2)))

    low, high = torch.full((1,), -2.0), torch.full((1,), 2.0)
    for seed in range(5):
        plan, plan_cost = sample.cem(cost, torch.zeros(4, 1), torch.ones(4, 1), low, high, iterations=3,
                                  generator=torch.Generator().manual_seed(seed))
        assert cost(plan[None]).item() == pytest.approx(plan_cost)    # the cost reported is the plan's
        assert plan_cost < cost(torch.zeros(1, 4, 1)).item() / 4      # far better than the start (4.0)
        assert (plan > 0).all() or (plan < 0).all(), plan             # in one of the two modes


def test_the_imagination_probes_targets_are_the_turn_and_the_move_in_the_players_own_frame():
    start = np.array([[170.0, 10, 5, 64, 127], [0, 0, 1, 64, 1], [90, 0, 1, 64, 1]])     # yaw, pitch, x, y, z
    end = np.array([[-170.0, 20, 5, 64, 1], [0, 0, 1, 64, 3], [90, 0, 3, 64, 1]])
    change = sample.view_and_move_change(start, end)
    np.testing.assert_allclose(change[:, :2], [[20, 10], [0, 0], [0, 0]])       # turned across -180/180
    np.testing.assert_allclose(change[0, 2:], [2 * np.cos(np.radians(170)), -2 * np.sin(np.radians(170))], atol=1e-9)
    np.testing.assert_allclose(change[1, 2:], [2, 0], atol=1e-9)               # yaw 0 faces +z: 2 blocks forward
    np.testing.assert_allclose(change[2, 2:], [-2, 0], atol=1e-9)              # yaw 90 faces -x: +x is backward


def test_ridge_probe_recovers_a_known_linear_map_and_scores_noise_as_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) * torch.linspace(1, 10, 8)    # features of unequal scales
    weights, bias = torch.randn(8, 3, generator=g), torch.tensor([1.0, -2.0, 0.5])
    y = x @ weights + bias + 0.01 * torch.randn(2000, 3, generator=g)
    fit = sample.fit_ridge(x[:1500], y[:1500], l2=1e-8)
    assert (sample.r_squared(fit(x[1500:]), y[1500:]) > 0.9999).all()
    recovered = fit(torch.eye(8)) - fit(torch.zeros(1, 8))               # the map, one input at a time
    assert torch.allclose(recovered.float(), weights, atol=1e-3)
    noise = torch.randn(2000, 2, generator=g)                           # targets unrelated to x
    fit = sample.fit_ridge(x[:1500], noise[:1500])
    assert (sample.r_squared(fit(x[1500:]), noise[1500:]).abs() < 0.05).all()


def test_the_ridge_penalty_is_chosen_on_held_out_training_rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    clean = x @ torch.randn(8, 2, generator=g)                # an exact linear map: no penalty is best
    assert sample.chosen_penalty(x, clean, (1e-6, 1.0, 100.0)) == 1e-6
    wide, noise = torch.randn(60, 200, generator=g), torch.randn(60, 2, generator=g)  # nothing to read:
    assert sample.chosen_penalty(wide, noise, (1e-6, 1.0, 100.0)) == 100.0            # shrink it all


def test_each_probe_is_fit_and_scored_only_where_its_target_is_known():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = torch.stack([x[:, 0], x[:, 1] + 3 * (x[:, 2] > 0), torch.full((2000,), float("nan"))], dim=1)
    y[x[:, 2] > 0, 1] = float("nan")     # unknown where a linear probe would fail: far away, say
    y[:1, 2] = 1.0                       # one known row: too few to fit
    scores = sample.probe_scores(x[:1500], y[:1500], x[1500:], y[1500:], l2=1e-8)
    assert scores[0] > 0.999 and scores[1] > 0.999 and math.isnan(scores[2])


def test_planner_rows_and_imagined_rollout_use_the_training_action_windows():
    cfg = small_config()
    torch.manual_seed(0)
    model = iwm.WorldModel(cfg).eval()
    randomize_head(model)
    controls = torch.tensor([[[2.0, -1.0, 0.7], [-3.0, 0.5, 0.2]]])           # (P=1, T=2, 3)
    rows = sample.controls_to_rows(controls, cfg.frame_skip)[0]
    c = pd.COLUMN
    assert rows.shape == (2 * cfg.frame_skip, len(pd.ACTION_COLUMNS))
    assert rows[:cfg.frame_skip, c["camera_yaw"]].eq(2.0).all() and rows[:cfg.frame_skip, c["forward"]].eq(1).all()
    assert rows[cfg.frame_skip:, c["camera_pitch"]].eq(0.5).all() and rows[cfg.frame_skip:, c["forward"]].eq(0).all()
    history = torch.randn(cfg.action_window, len(pd.ACTION_COLUMNS))
    latent, target = torch.randn(2, model.encoder.positions.shape[0], cfg.width)
    imagined = sample.imagine(model, (latent, target), history, rows[None])
    episode_rows = np.concatenate([history.numpy(), rows.numpy()])             # the start frame is row K
    windows = np.stack([iwm.action_window(episode_rows, cfg.action_window + (k + 1) * cfg.frame_skip,
                                          cfg.action_window) for k in range(2)])
    expected = model.rollout(latent[None], torch.from_numpy(windows)[None], target[None])
    assert torch.allclose(imagined, expected, atol=1e-6)


def test_goal_success_wraps_yaw_and_needs_position_only_for_walking():
    goal = np.array([179.0, 10.0, 5.0, 20.0, 5.0])
    assert sample.reached(np.array([-175.0, 20.0, 9.0, 20.0, 5.0]), goal, "turning")    # 6 degrees apart
    assert not sample.reached(np.array([-175.0, 20.0, 9.0, 20.0, 5.0]), goal, "walking")  # 4 blocks away
    assert sample.reached(np.array([170.0, 0.0, 6.0, 20.0, 5.5]), goal, "walking")
    assert not sample.reached(np.array([160.0, 10.0, 5.0, 20.0, 5.0]), goal, "turning")   # 19 degrees


def test_a_walking_goal_from_a_walled_in_start_moves_to_the_next_world():
    cfg = iwm.Config()
    # World 51036 starts in a pit that no walk of 100 directions gets out of: this used to end
    # `sample.py --plan --goal_seed 50000` in a traceback at its 37th walking goal.
    world, frame, goal = sample.make_goal(51036, "walking", cfg)
    assert not np.allclose(world.pos, pd.World(51036).pos) and frame.shape == (64, 64, 3)
    assert np.linalg.norm(goal[2:] - world.pos) > 0.7 * pd.WALK * sample.GOAL_STEPS * cfg.frame_skip
    world, _, _ = sample.make_goal(21000, "walking", cfg)                  # an open start stays where it is
    np.testing.assert_allclose(world.pos, pd.World(21000).pos)


def test_sample_py_plan_probe_and_surprise_write_their_results(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    common = ["--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "s")]
    sample.main(common + ["--plan", "--trials", "2", "--n", "1", "--scale", "1", "--goal_seed", "7", "--euler_steps", "2"])
    results = json.load(open(tmp_path / "s" / "plan.json"))
    assert results["goal_seed"] == 7
    for kind in ("turning", "walking"):
        assert set(results[kind]) == {"plan", "random"} and all(0 <= v <= 1 for v in results[kind].values())
    assert 0 < results["seconds_per_plan"]["mean"] <= results["seconds_per_plan"]["max"]
    cost = results["cost_per_imagined_step"]              # drawing and re-reading pixels costs far more
    assert cost["pixels"]["flops"] > 2 * cost["latent"]["flops"] and min(cost["pixels"]["ms"], cost["latent"]["ms"]) > 0
    ok, gif = cv2.imreadanimation(str(tmp_path / "s" / "plan_walking_0.gif"))
    assert ok and len(gif.frames) == sample.GOAL_STEPS + sample.EXTRA_STEPS + 1
    assert gif.frames[0].shape[1] == 3 * 32 + 2 * 2                        # goal | sees | imagined
    sample.main(common + ["--surprise", "--trials", "1"])
    assert json.load(open(tmp_path / "s" / "surprise.json"))["teleport_over_median_step"] > 0
    sample.main(common + ["--probe", "--probe_every", "10"])
    scores = json.load(open(tmp_path / "s" / "probe.json"))["r_squared"]
    assert set(scores) == {f"{e}, {p}" for e in ("trained", "random init") for p in sample.POOLINGS}
    assert all(set(row) == set(sample.PROBE_TARGETS) for row in scores.values())
    imagination = json.load(open(tmp_path / "s" / "probe.json"))["imagination_r_squared"]
    assert "trained, start + predicted 8, change over 8" in imagination and "random init, start twice, change over 4" in imagination
    assert all(set(row) == set(sample.CHANGES) | {"l2"} for row in imagination.values())
    assert "trained, start + the inputs themselves, change over 8" in imagination
    assert all(row["l2"] in sample.IMAGINATION_L2 for row in imagination.values())


# -----------------------------------------------------------------------------
# Benchmark, activation checkpointing, several processes


def test_spelled_out_cpu_attention_equals_the_fused_kernel():
    torch.manual_seed(0)
    attention = iwm.Attention(32, heads=4)
    x, context = torch.randn(2, 16, 32), torch.randn(2, 25, 32)
    for ctx in (None, context):
        q = attention.query(x).view(2, 16, 4, 8).transpose(1, 2)
        source = x if ctx is None else ctx
        k, v = attention.key_value(source).view(2, source.shape[1], 2, 4, 8).permute(2, 0, 3, 1, 4)
        fused = attention.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 32))
        assert torch.allclose(attention(x, ctx), fused, atol=1e-5)


def test_grad_ckpt_gives_the_same_loss_and_gradients():
    grads = []
    for grad_ckpt in (False, True):
        torch.manual_seed(0)
        model = iwm.WorldModel(small_config(grad_ckpt=grad_ckpt))
        randomize_head(model)
        randomize_zero_inits(model.decoder)
        g = torch.Generator().manual_seed(1)
        frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8, generator=g)
        actions = torch.randn(2, 2, 25, len(pd.ACTION_COLUMNS), generator=g)
        loss, _ = model(frames, actions, frames[:, 0])
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_bench_reports_throughput_flops_and_fraction_of_measured_peak(capsys):
    cfg = small_config(bench=2)
    result = iwm.benchmark(cfg)
    out = capsys.readouterr().out
    assert "samples/s" in out and "of peak" in out and "peak memory needs a CUDA GPU" in out
    assert result["flops_per_step"] > 0 and result["samples_per_s"] > 0
    assert 0 < result["fraction_of_peak"] < 1.5 and result["peak_memory_gib"] is None
    # the counted FLOPs grow with the batch: twice the windows, about twice the work
    doubled = iwm.benchmark(small_config(bench=1, batch_size=8))
    assert 1.8 < doubled["flops_per_step"] / result["flops_per_step"] < 2.2


def torchrun(flags, processes=2):
    """`torchrun --nproc_per_node=2 iwm.py FLAGS` on CPU (gloo), one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "iwm.py", *flags]
    result = subprocess.run(command, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def run_rank(rank, port, config, interrupt_rank=None):
    """One process of a 2-process run, as torchrun would start it; with interrupt_rank, only that
    process gets Ctrl-C, during step 2. Each process saves its own final weights beside the run.
    Module level, so torch.multiprocessing can start it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == interrupt_rank:
        iwm.WindowSampler.sample = sample_then_ctrl_c_in_step(2)
    if interrupt_rank is None:
        model, _ = iwm.fit(iwm.Config(**config))
        torch.save(model.state_dict(), os.path.join(config["out_dir"], f"rank{rank}.pt"))
    else:
        with pytest.raises(SystemExit) as stopped:
            iwm.fit(iwm.Config(**config))
        assert stopped.value.code == 130


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_keep_equal_weights_and_ema_and_resume_exactly(builtin_dataset, tmp_path):
    config = dataclasses.asdict(small_config(data=builtin_dataset, out_dir=str(tmp_path / "straight"), steps=4,
                                             ckpt_every=2, eval_every=4))
    torch.multiprocessing.spawn(run_rank, args=(free_port(), config), nprocs=2)
    state = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    ranks = [torch.load(tmp_path / "straight" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in state["model"]:          # both processes end with the saved weights, EMA target included
        assert torch.equal(ranks[0][key], state["model"][key]) and torch.equal(ranks[1][key], state["model"][key]), key
    assert not torch.equal(state["model"]["target_encoder.blocks.0.mlp.0.weight"], state["model"]["encoder.blocks.0.mlp.0.weight"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "straight" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]                                    # logged once, by rank 0
    # The same run, but rank 1 alone gets Ctrl-C in step 2: both ranks stop after step 2 and save;
    # resuming with torchrun ends with the unbroken run's weights, bit for bit
    config["out_dir"] = str(tmp_path / "resumed")
    torch.multiprocessing.spawn(run_rank, args=(free_port(), config, 1), nprocs=2)
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 2
    result = torchrun(["--out_dir", str(tmp_path / "resumed"), "--resume"])
    assert result.stdout.count("config:") == 1                     # only rank 0 talks
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 4
    for key in state["model"]:
        assert torch.equal(resumed["model"][key], state["model"][key]), key


# -----------------------------------------------------------------------------
# Bad input and faults: one clear line, a non-zero exit, nothing lost


def run_script(script, *flags, timeout=120):
    """A project script as a user runs it: (exit code, stdout + stderr)."""
    result = subprocess.run([sys.executable, script, *map(str, flags)], capture_output=True, text=True,
                            timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
    return result.returncode, result.stdout + result.stderr


def test_auto_precision_comes_from_the_cpus_instructions_not_a_timing_and_resume_keeps_it(
        builtin_dataset, tmp_path, monkeypatch):
    clock = iter(np.cumsum(np.random.default_rng(0).uniform(0, 5, 10_000)))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))          # a wildly busy machine
    for has_bf16, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert [iwm.choose_hardware(iwm.Config(device="cpu"), say=print)[1] for _ in range(5)] == [expected] * 5
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2, dtype="auto"))
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "float32"       # the choice is recorded
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)   # ... and kept on resume
    assert iwm.parse_config(["--out_dir", str(tmp_path), "--resume", "--steps", "4"]).dtype == "float32"


@pytest.mark.parametrize("gpu, capability, dtype", [("T4 (Colab)", (7, 5), "float16"), ("V100", (7, 0), "float16"),
                                                    ("RTX 3060", (8, 6), "bfloat16"), ("A100", (8, 0), "bfloat16")])
def test_gpu_precision_is_bf16_only_where_the_gpu_computes_it_natively(gpu, capability, dtype):
    assert iwm.autocast_dtype(gpu_capability=capability)[0] == dtype, gpu
    scaler = iwm.make_optimizer(iwm.WorldModel(small_config()), small_config(), "cpu", getattr(torch, dtype))[1]
    assert scaler.is_enabled() == (dtype == "float16")               # the gradient scaler only for fp16


def test_an_apple_gpu_is_used_only_when_asked_with_precision_from_the_macos_version(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device mps: this PyTorch sees no Apple-silicon GPU"):
        iwm.check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)   # a Mac, faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    iwm.check_device("mps")
    assert iwm.choose_hardware(iwm.Config(device="auto"), say=print)[0].type == "cpu"   # auto never picks it
    for macos_14, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14 and major <= 14)
        device, chosen = iwm.choose_hardware(iwm.Config(device="mps"), say=print)
        assert device.type == "mps" and chosen == dtype
    assert "precision: float32 (MPS before macOS 14: no bf16)" in capsys.readouterr().out


def test_auto_size_never_pairs_the_224_px_preset_with_smaller_frames(capsys):
    assert iwm.auto_size(cuda=False, resolution=224)[0] == "tiny"
    assert iwm.auto_size(cuda=True, resolution=64)[0] == "tiny"           # the built-in world's frames
    assert iwm.auto_size(cuda=True, resolution=128)[0] == "tiny"
    assert iwm.auto_size(cuda=True, resolution=224)[0] == "base"
    iwm.parse_config(["--data", "nowhere"])
    assert capsys.readouterr().out.startswith("size: tiny (a CPU and 64-px frames; pick with --size)")


def test_the_step_numbers_are_one_device_tensor_averaged_over_processes(monkeypatch):
    reduced = []
    monkeypatch.setattr(iwm.dist, "all_reduce", lambda tensor: reduced.append(tensor) or tensor.mul_(2))
    values = iwm.mean_over_processes([torch.tensor(3.0), torch.tensor([1.5]), 0.25, 1], torch.device("cpu"), 2)
    assert values == [3.0, 1.5, 0.25, 1.0] and len(reduced) == 1                  # one all-reduce per step
    assert reduced[0].device.type == "cpu" and reduced[0].shape == (4,)          # on the training device


def test_resume_refuses_a_size_that_contradicts_the_checkpoint(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2, size="small"))
    with pytest.raises(iwm.CheckpointError, match="holds a different model .size: checkpoint small vs requested tiny"):
        iwm.parse_config(["--out_dir", str(tmp_path), "--resume", "--size", "tiny"])
    code, out = run_script("iwm.py", "--out_dir", tmp_path, "--resume", "--size", "tiny")
    assert code == 1 and "size: checkpoint small vs requested tiny" in out and "Traceback" not in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])    # preemption, a closed terminal
def test_sigterm_or_sighup_saves_and_stops_like_ctrl_c(builtin_dataset, tmp_path, monkeypatch, signum):
    monkeypatch.setattr(iwm.WindowSampler, "sample", sample_then_ctrl_c_in_step(3, signum))
    with pytest.raises(SystemExit) as stopped:
        iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path)))
    assert stopped.value.code == 128 + signum
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_a_resumed_log_holds_each_step_once_after_a_kill(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    with open(tmp_path / "log.jsonl", "a") as f:     # what a kill -9 after step 5 leaves: steps past
        f.write('{"step": 4}\n{"step": 5}\n{"st')   # the checkpoint (3) and a line cut short
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=6, resume=True))
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_training_builds_the_builtin_dataset_when_the_default_folder_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                  # no data/builtin here
    monkeypatch.setattr(iwm, "BUILTIN_EPISODES", 2)
    iwm.fit(small_config(data=iwm.Config.data, out_dir="run", steps=1))
    assert "has no dataset yet: building the built-in world's first" in capsys.readouterr().out
    _, episodes = pd.load_dataset("data/builtin")
    assert len(episodes) == 2 and (tmp_path / "run" / "ckpt.pt").exists()


def test_a_fresh_run_never_overwrites_a_finished_one(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(iwm.CheckpointError, match="already holds a run: continue it with --resume"):
        iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_a_full_disk_while_saving_names_the_disk_and_keeps_the_last_checkpoint(builtin_dataset, tmp_path, monkeypatch):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=3))
    good = (tmp_path / "ckpt.pt").read_bytes()

    def full_disk(state, path):
        open(path, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1108")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(iwm.CheckpointError, match="ckpt.pt could not be written .* MB free.*last checkpoint is intact"):
        iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=6, resume=True))
    assert (tmp_path / "ckpt.pt").read_bytes() == good and not (tmp_path / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("flags, words", [
    (["--frame_skip", "0"], "--frame_skip 0: must be at least 1"),
    (["--action_window", "-2"], "--action_window -2: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--eval_every", "0"], "--eval_every 0: must be at least 1"),
    (["--ckpt_every", "-1"], "--ckpt_every -1: must be at least 1"),
    (["--eval_horizon", "0"], "--eval_horizon 0: must be at least 1"),
    (["--rollout", "0"], "--rollout 0: must be at least 1"),
    (["--lr", "-0.1"], "--lr -0.1: must be above 0"),
    (["--ema_start", "1.5"], "--ema_start 1.5: must be between 0 and 1"),
    (["--eval_psnr_windows", "-1"], "--eval_psnr_windows -1: must be 0 or more"),
    (["--width", "130"], "--width 130: must be divisible by 4 and by --heads 4"),
    (["--dtype", "float64"], "--dtype float64: choose one of"),
    (["--device", "cuda:99"], "--device cuda:99: this machine has"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda, cuda:N or mps"),
    (["--size", "huge"], "--size huge: choose one of"),
])
def test_iwm_refuses_settings_that_make_no_sense_before_any_work(flags, words, tmp_path):
    code, out = run_script("iwm.py", "--size", "tiny", "--data", tmp_path / "none", "--out_dir", tmp_path, *flags)
    assert code == 1 and words in out and "Traceback" not in out, out
    assert not os.listdir(tmp_path)                                          # nothing was started


@pytest.mark.parametrize("script, flags, words", [
    ("prepare_data.py", ["--synthetic", "0"], "--synthetic: must be at least 1"),
    ("prepare_data.py", ["--synthetic", "2", "--frames", "0"], "--frames: must be at least 10"),
    ("prepare_data.py", ["--synthetic", "2", "--workers", "0"], "--workers: must be at least 1"),
    ("prepare_data.py", ["--synthetic", "2", "--val_fraction", "1.5"], "--val_fraction: must be at least 0.001 and below 1"),
    ("prepare_data.py", ["--download", "x.json", "--n", "-1"], "--n: must be at least 1"),
    ("prepare_data.py", ["--download", "x.json", "--timeout", "0"], "--timeout: must be at least 0.1"),
    ("sample.py", ["--horizon", "0"], "--horizon: must be at least 1"),
    ("sample.py", ["--trials", "-5"], "--trials: must be at least 1"),
    ("sample.py", ["--windows", "0"], "--windows: must be at least 1"),
    ("sample.py", ["--device", "cuda:99"], "--device cuda:99: this machine has"),
])
def test_helper_scripts_refuse_counts_that_make_no_sense(script, flags, words):
    code, out = run_script(script, *flags)
    assert code != 0 and words in out and "Traceback" not in out, out


def test_broken_dataset_files_are_named_and_one_bad_episode_does_not_stop_the_rest(builtin_raw, tmp_path, capsys):
    data = tmp_path / "data"
    pd.convert_folder(str(builtin_raw), str(data), 64, "builtin")
    episodes = sorted((data / "episodes").iterdir())
    frames = episodes[0] / "frames.npy"
    frames.write_bytes(frames.read_bytes()[:3000])                           # truncated
    (episodes[1] / "actions.npy").write_bytes(b"garbage" * 50)               # not an array at all
    _, loaded = pd.load_dataset(str(data))
    out = capsys.readouterr().out
    assert [e["name"] for e in loaded] == [episodes[2].name]
    assert f"{frames} cannot be read" in out and f"{episodes[1] / 'actions.npy'} cannot be read" in out
    (data / "index.json").write_text('{"format": 1, "episodes": [')           # corrupt index
    with pytest.raises(pd.DatasetError, match="index.json is not valid JSON"):
        pd.load_dataset(str(data))
    code, out = run_script("iwm.py", "--data", data, "--out_dir", tmp_path / "run", "--steps", "1")
    assert code == 1 and "index.json is not valid JSON" in out and "Traceback" not in out


@pytest.mark.parametrize("field, value", [("mouse", {"dx": "left"}), ("keyboard", {"keys": "w"}),
                                          ("mouse", {"buttons": 0}), ("hotbar", "two"), ("yaw", [1]), ("mouse", 7)])
def test_a_wrongly_typed_jsonl_field_names_the_file_and_line(tmp_path, field, value):
    lines = [line() for _ in range(12)]
    lines[4][field] = value
    write_video(tmp_path / "bad-000000000001-20200101-000000.mp4", 12)
    write_jsonl(tmp_path / "bad-000000000001-20200101-000000.jsonl", lines)
    converted, problems = pd.convert_folder(str(tmp_path), str(tmp_path / "data"), 64, "vpt", workers=1)
    assert converted == 0 and len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'bad-000000000001-20200101-000000.jsonl'}: line 5: "), problems


def test_leftovers_of_killed_runs_are_cleaned_and_unpaired_files_reported(builtin_raw, tmp_path):
    data = tmp_path / "data"
    (data / "partial" / "builtin-000000000000-20260101-000000").mkdir(parents=True)   # a killed conversion's
    (data / "partial" / "builtin-000000000009-20260101-000000.99.tmp.mp4").write_bytes(b"half")   # and recording's
    raw = tmp_path / "raw"
    shutil.copytree(builtin_raw, raw)
    (raw / "lonely-000000000001-20200101-000000.jsonl").write_text(json.dumps(line()))
    converted, problems = pd.convert_folder(str(raw), str(data), 64, "builtin")
    assert converted == 3 and any("lonely" in p and "no matching" in p for p in problems)
    assert sorted(os.listdir(data / "episodes")) == sorted(p.stem for p in builtin_raw.glob("*.mp4"))
    assert not list((data / "partial").iterdir())


def test_an_unwritable_output_folder_is_one_clear_line(builtin_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out_dir in (blocker, blocker / "run"):          # the file itself, or a folder below it
        code, out = run_script("iwm.py", "--size", "tiny", "--data", builtin_dataset, "--out_dir", out_dir,
                               "--steps", "1", "--eval_horizon", "2")
        assert code == 1 and f"{blocker}: is a file, but a folder is needed there" in out, out
        assert "Traceback" not in out, out
    code, out = run_script("prepare_data.py", "--synthetic", "1", "--out", blocker / "data")
    assert code == 1 and f"{blocker}: is a file, but a folder is needed there" in out and "Traceback" not in out, out
    # a folder that exists where a new one was to go is said plainly (and the search for a file ends at /)
    assert pd.describe(FileExistsError(17, "File exists", str(tmp_path))) == f"{tmp_path}: File exists"


@pytest.fixture
def silent_server():
    """A server on 127.0.0.1 that accepts connections and never answers."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    listener.close()


def test_downloads_fail_fast_against_a_closed_port_or_a_silent_server(tmp_path, silent_server):
    closed = f"http://127.0.0.1:{free_port()}/"
    for base, flags in ((closed, []), (silent_server, ["--timeout", "0.3"])):
        index = tmp_path / "index.json"
        index.write_text(json.dumps({"basedir": base, "relpaths": [f"data/e{i}-00000000000{i}-20220101-000000.mp4"
                                                                   for i in range(8)]}))
        started = time.time()
        code, out = run_script("prepare_data.py", "--download", index, "--n", "5", "--out", tmp_path / "data", *flags)
        assert code == 1 and "2 episodes in a row failed" in out and "Traceback" not in out, out
        assert time.time() - started < 30, "it should give up after two episodes, not try all eight"


def test_a_download_that_gets_nothing_exits_non_zero(loopback_server, tmp_path):
    base, root, stems = loopback_server
    (root / "index.json").write_text(json.dumps({"basedir": base, "relpaths": ["data/6.13/gone-000000000001-20220101-000000.mp4"]}))
    code, out = run_script("prepare_data.py", "--download", base + "index.json", "--out", tmp_path / "data")
    assert code == 1 and "not on the server" in out and "no <stem>.mp4 + <stem>.jsonl pairs in it" in out


# -----------------------------------------------------------------------------
# Reruns, partial files, non-finite inputs, two runs at once, signals


def test_a_rerun_download_asks_the_server_nothing_and_a_gone_server_still_converts_what_arrived(loopback_server,
                                                                                              tmp_path):
    base, root, stems = loopback_server
    out, gone = tmp_path / "data", f"http://127.0.0.1:{free_port()}/index.json"
    code, _ = run_script("prepare_data.py", "--download", base + "index.json", "--n", "2", "--out", out)
    index = (out / "index.json").read_bytes()
    code, text = run_script("prepare_data.py", "--download", gone, "--n", "2", "--out", out)
    assert code == 0 and "nothing to download" in text and (out / "index.json").read_bytes() == index, text
    # one episode short, and the server gone: what arrived is converted, and the exit says what failed
    for ext in (".mp4", ".jsonl"):
        (out / "raw" / (stems[1] + ext)).unlink()
    (root / "index.json").write_text(json.dumps({"basedir": gone.rsplit("/", 1)[0] + "/",
                                                 "relpaths": [f"data/6.13/{s}.mp4" for s in stems]}))
    code, text = run_script("prepare_data.py", "--download", root / "index.json", "--n", "2", "--out", out, "--timeout", "1")
    assert code == 1 and "1 episodes are converted" in text and "Traceback" not in text, text


def test_another_res_into_a_folder_a_killed_run_left_is_refused(builtin_raw, tmp_path):
    pd.convert_folder(str(builtin_raw), str(tmp_path), 64, "builtin")
    (tmp_path / "index.json").unlink()                  # killed before it wrote the index
    with pytest.raises(pd.DatasetError, match="already holds 64x64 episodes; use another --out for --res 128"):
        pd.convert_folder(str(builtin_raw), str(tmp_path), 128, "builtin")


def test_an_empty_meta_json_is_converted_again_and_an_index_entry_without_split_is_named(builtin_raw, tmp_path, capsys):
    pd.convert_folder(str(builtin_raw), str(tmp_path), 64, "builtin")
    before = (tmp_path / "index.json").read_bytes()
    meta = sorted(tmp_path.glob("episodes/*/meta.json"))[0]
    meta.write_text("")                                 # cut short by a crash
    pd.convert_folder(str(builtin_raw), str(tmp_path), 64, "builtin")
    assert (tmp_path / "index.json").read_bytes() == before and json.loads(meta.read_text())["frames"] == 30
    index = json.loads(before)
    del index["episodes"][0]["split"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    _, episodes = pd.load_dataset(str(tmp_path))
    assert len(episodes) == 2 and "an episode entry without a name or split" in capsys.readouterr().out


def test_a_recording_cut_short_by_a_full_disk_is_not_kept(tmp_path, monkeypatch):
    real = pd.cv2.VideoWriter

    class FullDisk:                                     # frames after the 10th never reach the file
        def __init__(self, *args):
            self.writer, self.count = real(*args), 0

        def write(self, frame):
            self.count += 1
            if self.count <= 10:
                self.writer.write(frame)

        def release(self):
            self.writer.release()

    monkeypatch.setattr(pd.cv2, "VideoWriter", FullDisk)
    with pytest.raises(OSError, match="recorded 10 of 30 frames"):
        pd.write_synthetic_episode(str(tmp_path), "builtin-000000000001-20260101-000000", 1, 30)
    assert os.listdir(tmp_path) == []


def test_a_gif_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    panels = [np.zeros((3, 8, 8, 3), np.uint8)]
    path = str(tmp_path / "rollout_0.gif")
    sample.compose_gif(path, panels, ["x"], [np.zeros((8, A), np.float32)], 4, 1)
    good = open(path, "rb").read()

    def killed(name, animation):
        open(name, "wb").write(b"GIF89a")             # half written, then the process is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(sample.cv2, "imwriteanimation", killed)
    with pytest.raises(KeyboardInterrupt):
        sample.compose_gif(path, panels, ["x"], [np.zeros((8, A), np.float32)], 4, 1)
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["rollout_0.gif"]


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_mouse_moves_are_refused_naming_the_line(tmp_path, text):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(line()) + "\n" + json.dumps(line()).replace('"dx": 0', f'"dx": {text}') + "\n")
    with pytest.raises(pd.EpisodeError, match=r"e.jsonl: line 2: dx is .*, expected a finite number"):
        pd.read_episode(str(tmp_path / "e.mp4"), str(path), 64)


def test_stored_non_finite_actions_skip_the_episode_and_a_float32_nan_gives_no_float32_advice(builtin_raw, tmp_path,
                                                                                               capsys):
    pd.convert_folder(str(builtin_raw), str(tmp_path), 64, "builtin")
    actions = sorted(tmp_path.glob("episodes/*/actions.npy"))[0]
    bad = np.load(actions)
    bad[3, 0] = np.nan
    np.save(actions, bad)
    _, episodes = pd.load_dataset(str(tmp_path))
    assert len(episodes) == 2 and "NaN or infinite" in capsys.readouterr().out
    message = iwm.non_finite_loss(float("nan"), 7, str(tmp_path / "none.pt"), torch.float32)
    assert "no checkpoint was written yet" in message and "--dtype float32" not in message
    assert "--dtype float32" in iwm.non_finite_loss(float("nan"), 7, str(actions), torch.bfloat16)


def test_two_trainings_into_one_folder_the_second_stops_at_once(builtin_dataset, tmp_path):
    iwm.lock_run_folder(str(tmp_path))                 # this test process is "the first run"
    try:
        code, text = run_script("iwm.py", "--data", builtin_dataset, "--out_dir", tmp_path, "--steps", "2",
                                "--frame_skip", "2", "--eval_horizon", "4")
    finally:
        iwm.release_run_folder(str(tmp_path))
    assert code == 1 and "is in use by another run" in text and not (tmp_path / "ckpt.pt").exists(), text


def test_a_fresh_run_never_erases_the_log_of_a_run_whose_checkpoint_is_gone(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2))
    (tmp_path / "ckpt.pt").unlink()
    log = (tmp_path / "log.jsonl").read_bytes()
    with pytest.raises(iwm.CheckpointError, match="holds the log of an earlier run"):
        iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2))
    assert (tmp_path / "log.jsonl").read_bytes() == log


def test_an_empty_weights_only_or_incomplete_checkpoint_is_one_line(builtin_dataset, tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2))
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.save({k: state[k] for k in ("model", "config", "step")}, tmp_path / "ckpt.pt")
    code, text = run_script("iwm.py", "--out_dir", tmp_path, "--resume", "--steps", "4")
    assert code == 1 and "holds weights only" in text and "Traceback" not in text, text
    torch.save({**state, "config": {"steps": 4}}, tmp_path / "ckpt.pt")
    with pytest.raises(iwm.CheckpointError, match="its config lacks size, image_size"):
        iwm.load_checkpoint(str(tmp_path / "ckpt.pt"))
    (tmp_path / "ckpt.pt").write_bytes(b"")
    for script, flags in (("iwm.py", ["--out_dir", tmp_path, "--resume"]), ("sample.py", ["--ckpt", tmp_path / "ckpt.pt"])):
        code, text = run_script(script, *flags)
        assert code == 1 and "an empty file" in text and "delete it" in text and "Traceback" not in text, text


def test_messages_name_the_flag_the_folder_or_the_file_to_fix(builtin_raw, builtin_dataset, tmp_path):
    with pytest.raises(ValueError, match="--eval_horizon 20 model steps .* lower --eval_horizon"):
        iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path / "run"), eval_horizon=20))
    nested = tmp_path / "vpt" / "2022"
    nested.mkdir(parents=True)
    for ext in (".mp4", ".jsonl"):
        shutil.copy(builtin_raw / f"builtin-000000000001-20260101-000000{ext}", nested)
    code, text = run_script("prepare_data.py", "--vpt", tmp_path / "vpt", "--out", tmp_path / "data")
    assert code == 1 and "pass that folder to --vpt" in text and str(nested) in text, text
    full = OSError(28, "No space left on device")        # a write error names no file
    assert pd.describe(full, "runs/iwm") == "runs/iwm: No space left on device"


def test_sigterm_stops_a_conversion_and_its_workers_at_once(tmp_path):
    process = subprocess.Popen([sys.executable, "prepare_data.py", "--synthetic", "40", "--frames", "200", "--out",
                                str(tmp_path)], cwd=os.path.dirname(os.path.abspath(__file__)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("partial/*.tmp*")) and time.time() < deadline:   # the workers are recording
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    text, _ = process.communicate(timeout=20)
    assert process.returncode == 128 + signal.SIGTERM and "interrupted: finished episodes are kept" in text, text
    snapshot = sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    time.sleep(1.5)                                     # no worker is still writing
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file()) == snapshot


# -----------------------------------------------------------------------------
# GPU memory without a GPU: fake tensors carry shapes and dtypes but no data, and a dispatch
# mode adds up the bytes of the storages alive at each moment (docs/memory.md)

from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, rounded up to 512 as CUDA's caching
    allocator does, until the storage is freed; `peak` is the most alive at once: the
    allocated peak (no fragmentation, workspaces or CUDA context)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.alive = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in self.alive:
                storage, size = tensor.untyped_storage(), -(-tensor.untyped_storage().nbytes() // 512) * 512
                self.live += size
                self.peak = max(self.peak, self.live)
                self.alive[storage._cdata] = weakref.ref(storage, lambda _, key=storage._cdata, size=size: self.free(key, size))
        return out

    def free(self, key, size):
        self.live -= size
        del self.alive[key]


def fake_base_model():
    """The base preset at its defaults, its weights fake tensors that LiveBytes counts."""
    cfg = iwm.Config(**{**iwm.PRESETS["base"], "size": "base", "dtype": "bfloat16", "device": "cpu"})
    with torch.device("meta"):                  # built without memory, then given fake storage
        model = iwm.WorldModel(cfg)
    return cfg, model


def test_a_base_preset_training_step_fits_a_12_gb_gpu(capsys):
    """Two optimizer steps at the defaults (batch 8 x 4, bf16 autocast, activation checkpointing,
    fused AdamW, clipping, the EMA update). On a CPU the attention stores its weights, which the
    GPU's fused kernel does not: an upper bound there."""
    cfg, model = fake_base_model()
    with FakeTensorMode(allow_non_fake_inputs=True), LiveBytes() as memory:
        model = model.to_empty(device="cpu").train()
        weights = memory.live
        optimizer, _ = iwm.make_optimizer(model, cfg, "cuda", torch.bfloat16)       # fused, as on a GPU
        for _ in range(2):
            for _ in range(cfg.grad_accum):
                frames = torch.zeros(cfg.batch_size, cfg.rollout + 1, 224, 224, 3, dtype=torch.uint8)
                actions = torch.zeros(cfg.batch_size, cfg.rollout, cfg.action_window, A)
                with iwm.autocast_to("cpu", torch.bfloat16):
                    loss, _ = model(frames, actions, frames[:, 0])
                (loss / cfg.grad_accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_target(cfg.ema_start)
    with capsys.disabled():
        print(f"\nbase preset, one training step: weights + EMA target {weights / 2 ** 30:.2f} GiB, "
              f"peak allocated {memory.peak / 2 ** 30:.2f} GiB")
    assert 2.3 * 2 ** 30 < weights and memory.peak < 10 * 2 ** 30


def test_sample_py_decoding_with_the_base_preset_fits_a_12_gb_gpu(capsys):
    """sample.py's defaults: 64 windows of 16 steps, each drawn from its prediction, its target
    latent and its shuffled-action prediction (10 Euler steps), under bf16 autocast."""
    cfg, model = fake_base_model()
    with FakeTensorMode(allow_non_fake_inputs=True):
        frames = torch.zeros(64, 17, 224, 224, 3, dtype=torch.uint8)     # on the host in sample.py
        actions = torch.zeros(64, 16, cfg.action_window, A)
        with LiveBytes() as memory:
            model = model.to_empty(device="cpu").eval()
            drawn, draw = [], model.decoder.draw
            model.decoder.draw = lambda latent, *rest: drawn.append(len(latent)) or draw(latent, *rest)
            with pytest.raises(DataDependentOutputException):      # the final numbers: fake tensors have none
                iwm.evaluate(model, frames, actions, torch.device("cpu"), iwm.autocast_to("cpu", torch.bfloat16),
                             psnr_windows=64, euler_steps=cfg.euler_steps)
    with capsys.disabled():
        print(f"\nbase preset, sample.py's evaluation: peak allocated {memory.peak / 2 ** 30:.2f} GiB")
    assert sum(drawn) == 3 * 64 * 16 and max(drawn) <= 256          # all of it, in bounded chunks
    assert memory.peak < 10 * 2 ** 30


# -----------------------------------------------------------------------------
# Reliability, round 3: one test per class of defect (silent wrong data, splits, non-finite
# figures, tracebacks, the user's files, ignored flags, misleading advice)


def write_pair(folder, stem, lines, n_frames=None):
    write_video(folder / f"{stem}.mp4", n_frames or len(lines))
    write_jsonl(folder / f"{stem}.jsonl", lines)


def test_no_input_gives_a_wrong_dataset_silently(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        write_pair(raw, f"ok-{i:012x}-20200101-000000", [line() for _ in range(12)])
    write_pair(raw, ".dotted-000000000009-20200101-000000", [line() for _ in range(12)])   # a stem with a dot first
    out = tmp_path / "data[1]*?"                                # glob patterns in the folder's own name
    converted, problems = pd.convert_folder(str(raw), str(out), 64, "vpt", workers=1)
    _, episodes = pd.load_dataset(str(out))
    assert converted == 4 and len(episodes) == 4 and ".dotted-000000000009-20200101-000000" in {e["name"] for e in episodes}
    with pytest.raises(pd.DatasetError, match="already holds 64x64 episodes"):   # the resolution check sees them
        pd.convert_folder(str(raw), str(out), 128, "vpt", workers=1)
    for field, value, words in (("isGuiOpen", "false", "isGuiOpen is 'false', expected true or false"),
                                ("yaw", 1e39, "yaw is 1e+39, expected a finite number"),
                                ("mouse", {"dx": -4e38}, "dx is -4e+38, expected a finite number")):
        lines = [line() for _ in range(4)]
        lines[2][field] = value
        with pytest.raises(pd.EpisodeError, match=re.escape(f"line 3: {words}")):
            pd.actions_from_lines(lines)


def test_own_recordings_get_a_sensible_split_and_a_refusal_names_the_flag_that_fixes_it(tmp_path, capsys):
    stems = [f"cave-2024-05-{day:02d}" for day in range(1, 11)]          # not VPT's <alias>-<id>-<date>-<time>
    assert len({pd.session_of(s) for s in stems}) == 10
    episodes = [{"name": s, "split": pd.split_of(s, 0.1)} for s in stems]
    pd.balance_split(episodes, "session")
    assert {e["split"] for e in episodes} == {"train", "val"}
    one_session = [f"me-{7:012x}-20240501-{t:06d}" for t in range(4)]      # one VPT session, 4 chunks
    split = [{"name": s, "split": pd.split_of(s, 0.5)} for s in one_session]
    pd.balance_split(split, "session")
    assert len({e["split"] for e in split}) == 1                          # a session is never cut in two
    with pytest.raises(pd.DatasetError, match=r"split \(by session; 1 session\) puts .*--split episode"):
        pd.split_episodes("data/mine", {"split_by": "session"}, split)
    by_episode = [{"name": s, "split": pd.split_of(s, 0.5, "episode")} for s in one_session]
    pd.balance_split(by_episode, "episode")
    train, val = pd.split_episodes("data/mine", {"split_by": "episode"}, by_episode)
    assert train and val
    code, out = run_script("prepare_data.py", "--synthetic", "2", "--split", "sideways")
    assert code == 2 and "--split: invalid choice" in out


def test_a_figure_that_cannot_be_computed_is_null_in_strict_json_and_n_a_on_screen(builtin_dataset, tmp_path):
    cfg = small_config()
    model = iwm.WorldModel(cfg)
    still = torch.full((1, 5, 64, 64, 3), 90, dtype=torch.uint8)          # one window where nothing moves
    actions = torch.zeros(1, 4, cfg.action_window, A)
    metrics = iwm.evaluate(model, still, actions, torch.device("cpu"), iwm.autocast_to("cpu", torch.float32),
                           psnr_windows=1, euler_steps=1)
    assert metrics["pred_copy"] == [None] * 4 and metrics["target_std"] is None and metrics["sharpness"] == [None] * 4
    assert "pred/copy h=1..4: n/a n/a n/a n/a" in iwm.format_eval(1, metrics)
    json.loads(pd.to_json(metrics), parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    seventeen = torch.randint(0, 255, (17, 5, 64, 64, 3), dtype=torch.uint8)  # a last chunk of one window
    metrics = iwm.evaluate(model, seventeen, torch.zeros(17, 4, cfg.action_window, A), torch.device("cpu"),
                           iwm.autocast_to("cpu", torch.float32))
    assert math.isfinite(metrics["target_std"]) and metrics["target_std"] > 0
    assert math.isnan(sample.r_squared(torch.zeros(1, 2), torch.ones(1, 2))[0])            # one validation frame
    with pytest.raises(ValueError):
        json.dumps(float("inf"), allow_nan=False)
    pd.write_json(str(tmp_path / "m.json"), {"r2": float("-inf"), "rows": [float("nan"), 1.0]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"r2": None, "rows": [None, 1.0]}


def test_a_bad_value_anywhere_is_one_line_never_a_traceback(builtin_raw, builtin_dataset, tmp_path):
    lines = [line() for _ in range(12)]
    lines[6]["keyboard"]["keys"] = [["key.keyboard.w"]]                    # a list where a key name goes
    write_pair(tmp_path, "bad-000000000001-20200101-000000", lines)
    with pytest.raises(pd.EpisodeError, match=r"line 7: keys holds \['key.keyboard.w'\], expected only items"):
        pd.read_episode(str(tmp_path / "bad-000000000001-20200101-000000.mp4"),
                        str(tmp_path / "bad-000000000001-20200101-000000.jsonl"), 64)
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path / "run"), steps=1))
    for script, flags, words in (
            ("sample.py", ["--ckpt", tmp_path / "run" / "ckpt.pt", "--video", tmp_path / "bad-000000000001-20200101-000000.mp4"],
             "line 7: keys holds"),
            ("iwm.py", ["--seed", "-1"], "--seed -1: must be between 0 and"),
            ("iwm.py", ["--out_dir", ""], "--out_dir: must not be empty"),
            ("iwm.py", ["--lr", "inf"], "--lr inf: must be finite"),
            ("prepare_data.py", ["--synthetic", "1", "--seed", "-3"], "--seed: must be at least 0"),
            ("prepare_data.py", ["--synthetic", "1", "--out", ""], "--out: must not be empty"),
            ("sample.py", ["--goal_seed", "-1", "--plan"], "--goal_seed: must be at least 0"),
            ("sample.py", ["--out", " "], "--out: must not be empty")):
        code, out = run_script(script, *flags)
        assert code != 0 and words in out and "Traceback" not in out, (script, flags, out)


def test_the_converter_touches_only_its_own_files_and_two_conversions_never_share_a_folder(builtin_raw, tmp_path):
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    mine = data / "raw" / "notes.tmp.txt"                                  # the user's own file
    mine.write_text("keep me")
    shutil.copy(builtin_raw / "builtin-000000000000-20260101-000000.mp4", data / "raw")
    shutil.copy(builtin_raw / "builtin-000000000000-20260101-000000.jsonl", data / "raw")
    converted, _ = pd.convert_folder(str(data / "raw"), str(data), 64, "builtin", workers=1)
    assert converted == 1 and mine.read_text() == "keep me"
    assert pd.lock_folder(str(data), "convert.lock", "the test", "--out")   # "the first conversion"
    try:
        code, out = run_script("prepare_data.py", "--synthetic", "1", "--frames", "10", "--out", data)
    finally:
        pd.release_folder(str(data))
    assert code == 1 and "is in use by another run of prepare_data.py" in out, out
    assert sorted(os.listdir(data / "episodes")) == ["builtin-000000000000-20260101-000000"]


@pytest.mark.parametrize("flags, words", [
    (["--probe", "--horizon", "4"], "argument --horizon: not used by --probe"),
    (["--surprise", "--euler_steps", "2"], "argument --euler_steps: not used by --surprise"),
    (["--plan", "--actions", "turn_left"], "argument --actions: not used by --plan"),
    (["--probe_every", "3"], "argument --probe_every: not used by the rollouts"),
    (["--futures", "2", "--actions", "turn_left"], "argument --futures: not used with --actions"),
    (["--video", "x.mp4", "--data", "data/builtin"], "argument --data: not used with --video"),
    (["--video", "nowhere.mp4"], "nowhere.mp4: expected a <stem>.mp4 with its <stem>.jsonl beside it"),
])
def test_sample_py_refuses_flags_its_mode_would_ignore(flags, words, capsys):
    with pytest.raises(SystemExit) as stop:
        sample.parse_args(flags)
    assert stop.value.code == 2 and words in capsys.readouterr().err


def test_advice_points_the_right_way(builtin_raw, builtin_dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = run_script("prepare_data.py", "--vpt", empty, "--out", tmp_path / "nothing")
    assert code == 1 and f"{empty}: no <stem>.mp4 + <stem>.jsonl pairs in it" in out and "above" not in out, out
    upper = tmp_path / "upper"                                             # a camera's upper-case names
    upper.mkdir()
    stem = "builtin-000000000001-20260101-000000"
    shutil.copy(builtin_raw / f"{stem}.mp4", upper / f"{stem}.MP4")
    text = (builtin_raw / f"{stem}.jsonl").read_text()
    (upper / f"{stem}.JSONL").write_text("\ufeff" + text, encoding="utf-8")  # and a byte-order mark
    converted, problems = pd.convert_folder(str(upper), str(tmp_path / "upper_data"), 64, "vpt", workers=1)
    assert converted == 1 and not problems, problems
    run = tmp_path / "run"
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(run), steps=1))
    with pytest.raises(iwm.CheckpointError, match=f"is a folder, not a checkpoint: give the checkpoint in it, {run}/ckpt.pt"):
        iwm.load_checkpoint(str(run))
    moved = tmp_path / "moved"
    state = torch.load(run / "ckpt.pt", weights_only=True)
    torch.save({**state, "config": {**state["config"], "data": str(moved)}}, run / "ckpt.pt")
    with pytest.raises(SystemExit, match="is not there \\(moved or deleted\\?\\); give its folder with --data"):
        sample.main(["--ckpt", str(run / "ckpt.pt"), "--windows", "1", "--n", "0", "--horizon", "2"])
    failed = tmp_path / "failed"                                          # a run that diverges before any checkpoint
    code, out = run_script("iwm.py", "--size", "tiny", "--data", builtin_dataset, "--out_dir", failed, "--lr", "1e30",
                           "--steps", "4", "--eval_horizon", "2", "--warmup_steps", "1")
    assert code == 1 and "log.failed.jsonl" in out and "Traceback" not in out, out
    assert not (failed / "log.jsonl").exists() and (failed / "log.failed.jsonl").exists()
    warnings_out = subprocess.run([sys.executable, "-c", "import prepare_data, warnings; prepare_data.one_line_warnings(); "
                                   "warnings.warn('overflow')"], capture_output=True, text=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stderr
    assert warnings_out == "warning: overflow\n"


# -----------------------------------------------------------------------------
# What keeps the latents apart: --target ema | sigreg | vicreg | none


def test_sigreg_is_the_epps_pulley_statistic_near_its_floor_for_gaussians_and_far_above_for_a_constant():
    samples = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    statistic = iwm.sigreg(samples)
    torch.manual_seed(0)                                   # the same directions, computed directly
    directions = torch.randn(16, iwm.SIGREG_DIRECTIONS)
    directions = directions / directions.norm(dim=0)
    s = torch.linspace(0, 3, iwm.SIGREG_POINTS, dtype=torch.float64)
    x = (samples @ directions).double()
    empirical = torch.exp(1j * x[..., None] * s).mean(dim=0)                   # (directions, points)
    integrand = (empirical - torch.exp(-s ** 2 / 2)).abs() ** 2 * torch.exp(-s ** 2 / 2)
    direct = 2 * len(samples) * torch.trapezoid(integrand, s, dim=-1).mean()    # doubled: s < 0 mirrors s > 0
    assert statistic.item() == pytest.approx(direct.item(), rel=1e-4)
    gaussian = [iwm.sigreg(torch.randn(256, 32)).item() for _ in range(5)]
    assert 0.7 < np.mean(gaussian) < 1.5                                       # the floor, about 1
    assert iwm.sigreg(torch.zeros(256, 32)).item() > 0.3 * 256                 # a collapsed batch
    assert torch.isfinite(iwm.sigreg(torch.full((8, 4), 1e4)))


def test_vicreg_terms_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    spread = 3 * torch.randn(20_000, 4, generator=g)                           # std 3, independent
    variance, covariance = iwm.vicreg_terms(spread)
    assert variance.item() == 0 and covariance.item() < 0.05                   # 81 for two copies of one
    variance, covariance = iwm.vicreg_terms(torch.zeros(10, 4))                 # collapsed
    assert variance.item() == pytest.approx(1 - 1e-2) and covariance.item() == 0
    x = torch.randn(20_000, 1, generator=g)
    _, covariance = iwm.vicreg_terms(torch.cat([x, x], dim=1))                 # two copies of one feature
    assert covariance.item() == pytest.approx(2 * 1.0 ** 2 / 2, rel=0.05)


def test_effective_rank_of_known_matrices():
    x = torch.randn(10_000, 8, generator=torch.Generator().manual_seed(0))
    assert iwm.effective_rank(x.T @ x) == pytest.approx(8, rel=0.02)
    line = torch.outer(torch.randn(100), torch.randn(8)).double()              # every row on one line
    assert iwm.effective_rank(line.T @ line) == pytest.approx(1, abs=1e-3)
    two = torch.cat([torch.randn(500, 2), torch.zeros(500, 6)], dim=1)
    assert iwm.effective_rank(two.T @ two) == pytest.approx(2, rel=0.05)


def test_without_a_regulariser_the_online_target_collapses(builtin_dataset, tmp_path):
    figures = {}
    for target in ("none", "sigreg"):
        cfg = small_config(data=builtin_dataset, out_dir=str(tmp_path / target), target=target, steps=120,
                           eval_every=120, ckpt_every=120, lr=3e-3, warmup_steps=5, eval_psnr_windows=0)
        torch.manual_seed(0)
        untrained = iwm.evaluate(iwm.WorldModel(cfg), *iwm.prepare_run(cfg, print)[1:3], torch.device("cpu"),
                                 iwm.autocast_to("cpu", torch.float32))
        model, trained = iwm.fit(cfg)
        figures[target] = {key: (untrained[key], trained[key]) for key in ("target_std", "effective_rank")}
        assert model.target_encoder is None and not any("target_encoder" in k for k in model.state_dict())
    none, sigreg = figures["none"], figures["sigreg"]
    assert none["target_std"][1] < 0.5 * none["target_std"][0], figures     # the lesson, in numbers
    assert none["effective_rank"][1] < none["effective_rank"][0], figures
    assert sigreg["target_std"][1] > 10 * none["target_std"][1], figures
    assert sigreg["effective_rank"][1] > none["effective_rank"][1], figures


def test_a_checkpoint_records_its_target_resume_refuses_another_and_old_checkpoints_load_as_ema(builtin_dataset,
                                                                                                tmp_path):
    iwm.fit(small_config(data=builtin_dataset, out_dir=str(tmp_path), steps=2, target="vicreg"))
    with pytest.raises(iwm.CheckpointError, match="target: checkpoint vicreg vs requested ema"):
        iwm.parse_config(["--out_dir", str(tmp_path), "--resume", "--target", "ema"])
    code, out = run_script("iwm.py", "--target", "byol")
    assert code == 1 and "--target byol: choose one of ema, sigreg, vicreg, none" in out
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del state["config"]["target"]                                              # written before --target existed
    assert iwm.saved_config(state).target == "ema"


def regularizer_of_half(rank, port, samples, target, out):
    """One of two gloo processes: the regulariser of its half of the batch (module level, so that
    torch.multiprocessing can start it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(rank)                          # different seeds: the directions come from rank 0
    half = samples[rank * len(samples) // 2:(rank + 1) * len(samples) // 2].clone().requires_grad_()
    cfg = small_config(target=target)
    value = iwm.target_regularizer(half[:, None, None], cfg)               # (B, S=1, N=1, D)
    value.backward()
    torch.save((value.detach(), half.grad), os.path.join(out, f"{target}{rank}.pt"))
    torch.distributed.barrier()                     # neither leaves while the other still talks
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("target", ["sigreg", "vicreg"])
def test_two_gloo_processes_regularise_the_global_batch(tmp_path, target):
    samples = torch.randn(48, 8, generator=torch.Generator().manual_seed(3))
    torch.multiprocessing.spawn(regularizer_of_half, args=(free_port(), samples, target, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)                              # rank 0's directions
    whole = samples.clone().requires_grad_()
    expected = iwm.target_regularizer(whole[:, None, None], small_config(target=target))
    expected.backward()
    for rank in range(2):
        value, grad = torch.load(tmp_path / f"{target}{rank}.pt")
        assert value.item() == pytest.approx(expected.item(), rel=1e-5)
        # each process's gradient, once DDP averages it over the two, is the whole batch's
        torch.testing.assert_close(grad / 2, whole.grad[rank * 24:(rank + 1) * 24], rtol=1e-4, atol=1e-6)
