"""Every shipped config parses, and the paper presets run end to end at their true model sizes (dry run)."""
from pathlib import Path

import pytest

from vitlinearizer import runner
from vitlinearizer.config import build_config, load_yaml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))
PAPER = [p for p in CONFIGS if p.parent.name == "paper"]


def test_configs_exist():
    assert len(PAPER) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = build_config(load_yaml(path))
    assert cfg.output_dir


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
@pytest.mark.usefixtures("freed_memory")
def test_paper_preset_dry_run(path, tmp_path):
    """Two optimisation steps of the real architectures (random weights, 2 synthetic images, batch 1) at 64 px:
    the true widths and depths, and the position-embedding resampling a new resolution needs, at CI cost."""
    import warnings

    cfg = build_config(load_yaml(path))
    dry = runner.dry_run_config(cfg, str(tmp_path / path.stem), img_size=64)
    dry.train.progress = False
    stage = runner.distill if path.stem.startswith("distill") else runner.finetune
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="teacher.weights is not set")
        summary = stage(dry)
    assert summary["complete"] and summary["steps"] == 2
    assert Path(summary["exported"]).is_file()
    assert not any((tmp_path / path.stem / "checkpoints").glob("step_*"))  # dry runs write no checkpoints
    # The dry run builds exactly the configured student.
    meta = runner.read_metadata(summary["exported"])
    assert meta["model"] == cfg.student.model and meta["img_size"] == [64, 64]
    n_params = sum(t.numel() for k, t in runner.load_state_dict_safely(summary["exported"]).items() if k != "mask_token")
    expected = {"small": 44e6, "base": 99e6, "large": 346e6}[cfg.student.model.split("_")[1]]
    assert abs(n_params - expected) / expected < 0.03
