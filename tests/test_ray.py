"""`vlmrt caption --ray` and `vlmrt eval clipscore --ray` on a local Ray cluster this module starts
(2 CPUs, actors at 0.5 CPU each so Ray Data keeps CPU for its own tasks) and shuts down itself:
captions equal the local command's token for token, a killed run resumes without redoing finished
images, a changed setup is refused; the judge's report equals the local one; missing Ray and bad
flags are clear errors."""

import json
import sys

import pytest

from test_caption import make_images, pipe  # noqa: F401  (pipe: a module fixture)
from test_clipscore import clip_dirs, data  # noqa: F401  (fixtures)
from vlmrt.cli import main
from vlmrt.errors import VlmrtError
from vlmrt.eval import caption
from vlmrt.eval.caption import caption_folder
from vlmrt.eval.ray_caption import PipelineSpec, caption_folder_ray
from vlmrt.eval.ray_cluster import RayResources, _check_fits, check_reachable

TOKENS = 4
POOL = ["--ray", "--actors", "2", "--cpus-per-actor", "0.5"]
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of our own (never `ray stop`: that kills every Ray process on the machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


def caption_args(d, out, *more):
    return ["caption", "--model", "minigpt4-tiny", "--images", str(d), "--out", str(out), "--batch", "2",
            "--max-new-tokens", str(TOKENS), "--no-progress", *more]


@pytest.mark.timeout(240, method="signal")  # signal: the fixture still shuts the cluster down
def test_ray_captions_equal_local_and_a_killed_run_resumes(cluster, pipe, tmp_path, monkeypatch, capsys):  # noqa: F811
    d = make_images(tmp_path / "imgs", 7)
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    local = caption_folder(pipe, d, tmp_path / "local.json", batch_size=2, max_new_tokens=TOKENS, progress=False)

    out, add = tmp_path / "ray.json", caption.CaptionsFile.add

    def add_then_kill(self, batch):  # the driver is killed right after its first finished block
        add(self, batch)
        raise KeyboardInterrupt

    monkeypatch.setattr(caption.CaptionsFile, "add", add_then_kill)
    with pytest.raises(KeyboardInterrupt):
        caption_folder_ray(PipelineSpec("minigpt4-tiny"), d, out, RayResources(actors=1, cpus_per_actor=0.5),
                           batch_size=2, max_new_tokens=TOKENS, progress=False)
    monkeypatch.undo()
    partial = json.loads(out.read_text())
    first = {e["image"]: e for e in partial["entries"]}
    assert not partial["complete"] and 0 < len(first) < 8 and partial["pending"] == 8 - len(first)
    assert any("caption" in e for e in first.values())  # so the check below that none is redone can fail

    assert main(caption_args(d, out, *POOL)) == 0  # resume, through the CLI
    assert "7 images captioned, 1 unreadable" in capsys.readouterr().err
    done = json.loads(out.read_text())
    assert {k: v for k, v in done.items() if k != "entries"} == {k: v for k, v in local.items() if k != "entries"}
    for r, l in zip(done["entries"], local["entries"], strict=True):
        assert r["image"] == l["image"] and r.keys() == l.keys()
        assert (r.get("token_ids"), r.get("caption"), r.get("finish_reason")) == \
            (l.get("token_ids"), l.get("caption"), l.get("finish_reason"))
        if "caption" in first.get(r["image"], {}):
            assert r["timings"] == first[r["image"]]["timings"]  # kept from the killed run, not captioned again
    assert "error" in done["entries"][0] and done["entries"][0]["image"] == "broken.jpg"

    assert main(caption_args(d, out, "--prompt", "What is this?", *POOL)) == 2
    assert "different setup (prompt:" in capsys.readouterr().err


@pytest.mark.timeout(240, method="signal")
def test_ray_errors_inside_the_cluster_are_one_line(cluster, tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 1)
    args = caption_args(d, tmp_path / "o.json", *POOL)
    args[2] = "no-such-model"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.json").exists()


@pytest.mark.timeout(240, method="signal")
def test_ray_clipscore_equals_local(cluster, clip_dirs, data):  # noqa: F811
    from vlmrt.eval.clip_loader import load_clip
    from vlmrt.eval.clipscore import clipscore_report
    from vlmrt.eval.ray_clipscore import clipscore_report_ray

    _, oc_dir = clip_dirs
    images, a_file, b_file = data
    local = clipscore_report(load_clip(oc_dir), images, [a_file, b_file])
    doc = clipscore_report_ray(oc_dir, images, [a_file, b_file], RayResources(actors=2), batch_size=3)  # 2 blocks
    assert doc["source"] == "open_clip" and doc["notes"] == local["notes"]
    for r, l in zip(doc["sets"], local["sets"], strict=True):
        assert list(r["scores"]) == list(l["scores"]) and r["name"] == l["name"]
        assert list(r["scores"].values()) == pytest.approx(list(l["scores"].values()), abs=1e-5)
    (r,), (l,) = doc["comparisons"], local["comparisons"]
    assert (r["mean_diff"], r["ci_low"], r["ci_high"]) == pytest.approx((l["mean_diff"], l["ci_low"], l["ci_high"]),
                                                                        abs=1e-5)


def test_without_ray_the_flag_names_the_extra(tmp_path, monkeypatch, capsys, data):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as when it is not installed
    d = make_images(tmp_path / "imgs", 1)
    assert main(caption_args(d, tmp_path / "o.json", "--ray")) == 2
    assert "pip install 'vlmrt[ray]'" in capsys.readouterr().err and not (tmp_path / "o.json").exists()
    images, a_file, _ = data
    assert main(["eval", "clipscore", "--images", str(images), "--captions", str(a_file), "--clip", str(tmp_path),
                 "--ray"]) == 2
    assert "pip install 'vlmrt[ray]'" in capsys.readouterr().err


def test_ray_flags_and_resources_are_checked(tmp_path, capsys):
    d = make_images(tmp_path / "imgs", 1)
    assert main(caption_args(d, tmp_path / "o.json", "--actors", "2", "--address", "h:1")) == 2
    assert "--address, --actors only apply to a Ray run; add --ray" in capsys.readouterr().err
    assert main(caption_args(d, tmp_path / "o.json", "--ray", "--actors", "0")) == 2
    assert "--actors must be at least 1" in capsys.readouterr().err
    assert main(caption_args(d, tmp_path / "o.json", "--ray", "--device", "cuda")) == 2
    assert "--device cuda with --ray needs GPUs per actor" in capsys.readouterr().err
    with pytest.raises(VlmrtError, match="must hold some CPU or GPU"):
        RayResources(cpus_per_actor=0)
    with pytest.raises(VlmrtError, match=r"asks for 4 x 1.0 CPU but the cluster has 2; lower --actors"):
        _check_fits({"CPU": 2.0}, RayResources(actors=4, cpus_per_actor=1.0), local=True)
    _check_fits({"CPU": 2.0, "GPU": 1.0}, RayResources(actors=2, gpus_per_actor=1), local=False)  # may grow: a note
    assert "2 x 1 GPU but the cluster has 1; the job waits" in capsys.readouterr().err
    _check_fits({"CPU": 2.0}, RayResources(actors=4, cpus_per_actor=0.5), local=True)  # fits exactly
    with pytest.raises(VlmrtError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        check_reachable("127.0.0.1:1")  # nothing listens on port 1: refused at once
    with pytest.raises(VlmrtError, match="is not HOST:PORT"):
        check_reachable("head-node")
