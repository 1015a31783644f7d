"""``rdm export`` and ``save_pretrained`` never lose a user's files: nothing is replaced without --overwrite,
only the pipeline's own files are, and a failed write leaves the folder exactly as it was."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_diffusion.cli import main as rdm


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def export(out: Path, *args: str):
    return CliRunner().invoke(rdm, ["export", f"--out={out}", *args])


def test_existing_stage_files_are_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "pipe"
    out.mkdir()
    (out / "stage1-16x16.safetensors").write_bytes(b"the user's own file")
    (out / "notes.txt").write_text("keep me")
    before = files(tmp_path)
    res = export(out)
    assert res.exit_code != 0 and "stage1-16x16.safetensors" in res.output and "--overwrite" in res.output
    assert files(tmp_path) == before

    res = export(out, "--overwrite")
    assert res.exit_code == 0, res.output
    after = files(out)
    assert after["notes.txt"] == b"keep me" and after["stage1-16x16.safetensors"] != b"the user's own file"
    guides = [f"stage{i}-{r}-guide.{ext}" for i, r in ((1, "16x16"), (2, "64x64")) for ext in ("json", "safetensors")]
    assert sorted(after) == sorted(["notes.txt", "pipeline.json", "stage1-16x16.json", "stage1-16x16.safetensors",
                                    "stage2-64x64.json", "stage2-64x64.safetensors"] + guides)  # the emoji preset's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary folder left


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    import relay_diffusion.checkpoints.snapshot as snapshot

    out = tmp_path / "pipe"
    assert export(out).exit_code == 0
    (out / "notes.txt").write_text("keep me")
    before = files(tmp_path)
    real, calls = snapshot.save_network, []

    def full_disk_on_the_second_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot, "save_network", full_disk_on_the_second_stage)
    res = export(out, "--overwrite", "--num_steps_first=7")
    assert res.exit_code != 0 and "No space left" in res.output and "Traceback" not in res.output
    assert len(calls) == 2
    assert files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_the_api_can_refuse_to_overwrite(tmp_path):
    from relay_diffusion import RelayPipeline

    pipe = RelayPipeline.from_bundled("cpu")
    pipe.save_pretrained(tmp_path / "p")
    with pytest.raises(FileExistsError, match="pipeline.json"):
        pipe.save_pretrained(tmp_path / "p", overwrite=False)
    assert pipe.save_pretrained(tmp_path / "p") == tmp_path / "p" / "pipeline.json"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_generate_never_writes_over_its_own_inputs(tmp_path, overwrite):
    folder = tmp_path / "images"
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={folder}", "--seeds=0-1", "--device=cpu",
                                   "--sampler_stages=first"])
    assert res.exit_code == 0, res.output
    before = files(folder)
    res = CliRunner().invoke(rdm, ["generate", f"--indir={folder}", f"--outdir={folder}/.", "--seeds=0-1",
                                   "--device=cpu", "--sampler_stages=second", *overwrite])
    assert res.exit_code != 0 and "is the input folder --indir" in res.output and "Traceback" not in res.output
    assert files(folder) == before


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_convert_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import relay_diffusion.checkpoints.snapshot as snapshot
    from test_reference_import import tiny_network, write_reference_pkl

    write_reference_pkl(tmp_path / "net.pkl", tiny_network(8, label_dim=0, seed=1), tmp_path / "marker")
    monkeypatch.setattr(snapshot, "save_network", _full_disk)
    res = CliRunner().invoke(rdm, ["convert", str(tmp_path / "net.pkl"), str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines() == [f"Error: cannot write {tmp_path / 'out'}: No space left on device"]


def test_demo_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import relay_diffusion.utils.images as images

    monkeypatch.setattr(images, "save_png", _full_disk)
    res = CliRunner().invoke(rdm, ["demo", f"--outdir={tmp_path / 'demo'}", "--seeds=0-3", "--num_steps_first=2",
                                   "--num_steps_second=2", "--device=cpu"])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    last = res.output.strip().splitlines()[-1]  # after the progress bars' carriage returns
    assert last.endswith(f"Error: cannot write into {tmp_path / 'demo'}: No space left on device"), last


def test_a_folder_from_before_tf32_was_recorded_still_resumes_on_the_cpu(tmp_path):
    import json

    out = tmp_path / "gen"
    args = ["generate", f"--outdir={out}", "--seeds=0-1", "--device=cpu", "--sampler_stages=first",
            "--num_steps_first=2"]
    assert CliRunner().invoke(rdm, args).exit_code == 0
    manifest = json.loads((out / "generation.json").read_text())
    assert "tf32" in manifest
    del manifest["tf32"]  # as an earlier version wrote it
    (out / "generation.json").write_text(json.dumps(manifest))
    (out / "000001.png").unlink()
    res = CliRunner().invoke(rdm, args)
    assert res.exit_code == 0, res.output
    assert (out / "000001.png").is_file()


def test_a_deeply_nested_manifest_is_one_line(tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "generation.json").write_text("[" * 100_000 + "]" * 100_000)
    res = CliRunner().invoke(rdm, ["generate", f"--outdir={out}", "--seeds=0", "--device=cpu",
                                   "--sampler_stages=first", "--num_steps_first=2"])
    assert res.exit_code != 0 and "Traceback" not in res.output and "nested too deeply" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["generation.json"]


def test_generation_json_records_each_stage_s_network_evaluations(tmp_path):
    import json

    out = tmp_path / "gen"
    args = ["generate", f"--outdir={out}", "--seeds=0", "--device=cpu", "--preset=default", "--num_steps_first=4",
            "--num_steps_second=18", "--solver_second=multistep"]
    res = CliRunner().invoke(rdm, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["nfe"] == [7, 7]  # heun: 2 x 4 - 1; the multistep relay grid truncated to 7 steps
    assert "NFE per image (denoiser evaluations): 7 + 7 = 14" in res.output
    del manifest["nfe"]  # a folder from before nfe was recorded
    (out / "generation.json").write_text(json.dumps(manifest))
    assert CliRunner().invoke(rdm, args).exit_code == 0
