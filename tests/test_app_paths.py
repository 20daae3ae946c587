"""The explorer served beyond localhost opens only the paths named at start-up (mmel.app.paths); on localhost any.

No browser: the policy itself, then through :class:`mmel.app.models.ModelCache` (what the page's boxes reach), then
the command line that builds it."""

from __future__ import annotations

import os

import pytest
import torch

from mmel.app import models
from mmel.app.inputs import InputError
from mmel.app.models import BackboneSpec, ModelCache
from mmel.app.paths import PathPolicy, is_exposed

SPECS = {"micro": BackboneSpec("micro", "mmel-micro", None)}


@pytest.mark.parametrize(
    ("host", "share", "exposed"),
    [
        ("127.0.0.1", False, False),
        ("127.0.0.2", False, False),
        ("::1", False, False),
        ("[::1]", False, False),
        ("localhost", False, False),
        ("127.0.0.1", True, True),  # a share link reaches the server from anywhere
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("192.168.1.5", False, True),
        ("my-workstation", False, True),  # a name may resolve to a public interface
    ],
)
def test_which_bindings_are_exposed(host, share, exposed):
    assert is_exposed(host, share) is exposed


@pytest.fixture
def layout(tmp_path):
    """A weights folder with one file, a secret file outside it, and a symlink inside pointing at the secret."""
    wdir, outside = tmp_path / "weights", tmp_path / "private"
    wdir.mkdir()
    outside.mkdir()
    (wdir / "ok.safetensors").write_bytes(b"weights")
    secret = outside / "secret.pt"
    secret.write_bytes(b"secret")
    os.symlink(secret, wdir / "link.pt")
    return wdir, secret


def test_exposed_weights_are_confined_to_the_weights_folder(layout):
    wdir, secret = layout
    policy = PathPolicy.for_server("0.0.0.0", False, [], wdir)
    ok = str((wdir / "ok.safetensors").resolve())
    assert policy.weights(str(wdir / "ok.safetensors")) == ok
    assert policy.weights("ok.safetensors") == ok  # a bare name is taken inside the folder
    assert policy.weights("  ") is None  # an empty box: the config's own weights
    for escape in (str(secret), "../private/secret.pt", str(wdir / ".." / "private" / "secret.pt"), "link.pt",
                   "missing.pt", "/etc/passwd"):  # fmt: skip
        with pytest.raises(InputError, match="not a file in this server's weights folder"):
            policy.weights(escape)
    with pytest.raises(InputError, match="loads no weights files"):  # no --weights-dir: no file at all
        PathPolicy.for_server("0.0.0.0", False).weights("ok.safetensors")


def test_local_server_takes_any_path(layout):
    wdir, secret = layout
    policy = PathPolicy.for_server("127.0.0.1", False, [], wdir)
    assert not policy.exposed
    assert policy.weights(str(secret)) == str(secret) and policy.checkpoint(str(secret)) == str(secret)


def test_exposed_checkpoints_are_the_offered_ones_or_in_the_weights_folder(layout, tmp_path):
    wdir, secret = layout
    offered = tmp_path / "logs" / "run" / "hsrm.pt"
    offered.parent.mkdir(parents=True)
    offered.write_bytes(b"hsrm")
    (wdir / "extra_hsrm.pt").write_bytes(b"hsrm")
    policy = PathPolicy.for_server("0.0.0.0", False, [offered], wdir)
    assert policy.checkpoint(str(offered)) == str(offered.resolve())
    assert policy.checkpoint(str(offered.parent / ".." / "run" / "hsrm.pt")) == str(offered.resolve())
    assert policy.checkpoint(str(wdir / "extra_hsrm.pt")) == str((wdir / "extra_hsrm.pt").resolve())
    assert policy.checkpoint(None) is None
    for escape in (str(secret), str(wdir / "link.pt"), str(wdir / ".." / "private" / "secret.pt")):
        with pytest.raises(InputError, match="not one of the checkpoints this server offers"):
            policy.checkpoint(escape)


def test_a_missing_weights_folder_is_an_error_at_start_up(tmp_path):
    with pytest.raises(NotADirectoryError, match="--weights-dir .*nope: no such folder"):
        PathPolicy.for_server("0.0.0.0", False, [], tmp_path / "nope")


@pytest.fixture(scope="module")
def micro_files(tmp_path_factory):
    """A weight file and an HSRM checkpoint of the micro CLIP, outside any weights folder."""
    from safetensors.torch import save_file

    from mmel.backbone import load_clip
    from mmel.hsrm import HSRM, hsrm_config, save_hsrm

    d = tmp_path_factory.mktemp("elsewhere")
    torch.manual_seed(0)
    clip = load_clip("mmel-micro")
    weights = d / "micro.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    hsrm = HSRM.for_clip(clip.model, num_layers=2, scales=(2,))
    ckpt = save_hsrm(d / "hsrm.pt", hsrm, hsrm_config(clip, [0, 1], [2], 0.1))
    return weights, ckpt


@pytest.mark.filterwarnings("ignore:.*was trained on mmel-micro weights:UserWarning")  # random CLIPs differ per build
def test_the_page_reaches_files_only_through_the_policy(micro_files, tmp_path):
    weights, ckpt = micro_files
    exposed = ModelCache(dict(SPECS), policy=PathPolicy.for_server("0.0.0.0", False, [], tmp_path))
    with pytest.raises(InputError, match="Weights file: .* not a file in this server's weights folder"):
        exposed.clip("micro", str(weights))
    with pytest.raises(InputError, match="Checkpoint: .* not one of the checkpoints"):
        exposed.explainer("micro", f"mmel{models.CHECKPOINT_SEP}{ckpt}")
    assert not any(k[0] != "clip" or k[2] is not None for k in exposed.loaded())  # nothing was opened
    local = ModelCache(dict(SPECS), policy=PathPolicy.for_server("127.0.0.1", False))
    assert local.clip("micro", str(weights)).fingerprint  # the same file loads on localhost
    assert local.explainer("micro", f"mmel{models.CHECKPOINT_SEP}{ckpt}") is not None
    offered = ModelCache(dict(SPECS), policy=PathPolicy.for_server("0.0.0.0", False, [ckpt]))
    assert offered.explainer("micro", f"mmel{models.CHECKPOINT_SEP}{ckpt}") is not None  # offered at start-up


def test_command_line_builds_the_policy_from_host_share_and_weights_dir(monkeypatch, tmp_path):
    pytest.importorskip("gradio")
    import mmel.app.ui as ui
    from mmel.app.__main__ import main

    built = {}
    monkeypatch.setattr(ui, "build_app", lambda cache, **kw: built.setdefault("cache", cache))
    monkeypatch.setattr(ui, "serve", lambda *a, **kw: None)
    monkeypatch.setattr(models, "backbone_specs", lambda *a, **kw: dict(SPECS))
    wdir = tmp_path / "w"
    wdir.mkdir()
    args = ["--logs", str(tmp_path / "no-logs"), "--data-root", str(tmp_path / "shapes")]
    assert main(["--host", "0.0.0.0", "--weights-dir", str(wdir), *args]) == 0
    policy = built.pop("cache").policy
    assert policy.exposed and policy.weights_dir == wdir.resolve()
    assert main([*args]) == 0 and not built.pop("cache").policy.exposed  # the default: localhost
    assert main(["--share", *args]) == 0 and built.pop("cache").policy.exposed
    assert main(["--host", "0.0.0.0", "--weights-dir", str(tmp_path / "nope"), *args]) == 2
