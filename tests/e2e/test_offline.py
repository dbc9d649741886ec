"""Offline and on a login node: the published families' configs ship with cogtune, other hub ids
come from the Hugging Face cache first, and a hub that cannot be reached is named as the problem
(without retrying) instead of the file it could not read."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cogtune.errors import CogtuneError
from cogtune.families import ModelConfigs
from cogtune.families.cogvideox import CogVideoX
from cogtune.templates import TEMPLATES
from cogtune.util import hub

FAMILY_CONFIGS = sorted(p for p in (TEMPLATES / "configs").glob("cogvideox*.toml"))


class Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in hub that answers 404 to everything and counts the requests."""

    requests: list[str] = []

    def do_HEAD(self):
        Recorder.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cogtune(*args, **env) -> subprocess.CompletedProcess:
    """The command line in a new process, so that huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE."""
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "cogtune", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300)


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "online"])
@pytest.mark.parametrize("path", FAMILY_CONFIGS, ids=[p.stem for p in FAMILY_CONFIGS])
def test_every_published_family_is_known_without_the_network(path, offline, stand_in_hub, monkeypatch):
    """What --dry_run and the pre-flight checks need: configs, family, clip-size checks, the cache name."""
    from cogtune.cache.identity import cache_identity
    from cogtune.config import data_settings, load_config

    monkeypatch.setenv("HF_ENDPOINT", stand_in_hub)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = load_config("train", ["--config", str(path)])
    models = ModelConfigs.of(config)
    spec = models.spec()
    data = data_settings(config, ["--config", str(path)])
    spec.check_clip_size(data.max_num_frames, data.height, data.width, data.ignore_learned_positional_embeddings)
    assert cache_identity(data, models).name.startswith(Path(config.pretrained_model_name_or_path).name + "_")
    assert ("image-to-video" in spec.description) == ("i2v" in path.stem)
    assert ("1.5" in spec.description) == ("1.5" in path.stem)
    assert models.transformer["num_layers"] == (30 if "2b" in path.stem else 42)
    assert Recorder.requests == []


def test_dry_run_of_a_published_model_needs_no_hub(stand_in_hub):
    """Without HF_HUB_OFFLINE, with a hub there to be asked: nothing is asked."""
    path = TEMPLATES / "configs" / "cogvideox-2b-lora.toml"
    result = run_cogtune("train", "--config", path, "--dry_run", "--max_num_frames", "9", "--height", "64",
                         "--width", "96", HF_ENDPOINT=stand_in_hub)
    assert result.returncode == 0, result.stderr
    assert "Expected peak GPU memory for CogVideoX 1.0 text-to-video" in result.stdout
    assert Recorder.requests == []


def test_an_unknown_hub_id_fails_saying_the_hub_cannot_be_reached(tmp_path):
    args = ("train", "--dry_run", "--pretrained_model_name_or_path", "someone/my-cogvideox")
    refused = run_cogtune(*args, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "could not be reached" in refused.stderr and "local copy" in refused.stderr
    assert "does not appear to have a file" not in refused.stderr
    offline = run_cogtune(*args, HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr


def test_a_hub_that_accepts_but_never_answers_is_given_up_on(monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        monkeypatch.setattr(hub, "REACH_TIMEOUT_S", 0.5)
        hub.unreachable_reason.cache_clear()
        assert hub.unreachable_reason(f"http://127.0.0.1:{silent.getsockname()[1]}") is not None
    finally:
        silent.close()
        hub.unreachable_reason.cache_clear()


def test_any_http_answer_means_the_hub_is_there(stand_in_hub):
    hub.unreachable_reason.cache_clear()
    try:
        assert hub.unreachable_reason(stand_in_hub) is None
        assert Recorder.requests == ["/"]
    finally:
        hub.unreachable_reason.cache_clear()


def test_a_mistyped_local_path_is_named_as_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./models/CogVideoX-5b", "models/CogVideoX-5b", str(tmp_path / "CogVideoX-5b"), "~/nope/x"):
        with pytest.raises(CogtuneError, match="does not exist"):
            ModelConfigs.load(name)


def test_a_hub_id_in_the_hugging_face_cache_loads_configs_and_weights_without_the_network(tmp_path, tiny_model):
    """The cache layout huggingface_hub writes (models--ns--name/snapshots/<commit>, refs/main):
    configs and weights come from there when the hub cannot be reached."""
    script = f"""
import shutil, sys
from pathlib import Path
from diffusers import CogVideoXTransformer3DModel
from cogtune.families import ModelConfigs
repo = Path({str(tmp_path)!r}) / "models--someone--tiny-cogvideox"
snapshot = repo / "snapshots" / ("0" * 40)
shutil.copytree({str(tiny_model)!r}, snapshot)
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text("0" * 40)
models = ModelConfigs.load("someone/tiny-cogvideox", cache_dir={str(tmp_path)!r})
assert models.spec().description.startswith("CogVideoX 1.0 text-to-video")
transformer = models.load_part(CogVideoXTransformer3DModel, "transformer")
print("loaded", sum(p.numel() for p in transformer.parameters()))
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("loaded ")


def test_published_ids_cover_both_namespaces_of_every_family():
    families = {"cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v"}
    assert set(CogVideoX.published.values()) == families
    for namespace in ("thudm", "zai-org"):
        assert {name.split("/")[1] for name in CogVideoX.published if name.startswith(namespace)} == families
    for folder in families:
        assert ModelConfigs.load(f"THUDM/{folder}").transformer["text_embed_dim"] == 4096
    assert ModelConfigs.load("thudm/cogvideox-5B").location == "thudm/cogvideox-5B"
