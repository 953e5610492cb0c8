"""The one config tree: validation names the key, overrides apply, the resolved config round-trips."""
import subprocess
import sys

import pytest
import yaml

from udean.config import CONFIG_DIR, Config, ConfigError, load, save


def test_paper_config_holds_the_paper_values():
    cfg = load("paper")
    assert cfg.data.split.counts == (120, 120, 30, 30)
    assert cfg.data.degradation.method == "kspace" and cfg.data.degradation.scale == (2, 2, 2)
    assert cfg.data.patches.lr_size == (64, 64) and cfg.data.patches.slab == 3
    assert (cfg.model.n_groups, cfg.model.n_rcab, cfg.model.encoder_layers) == (5, 5, 6)
    assert (cfg.loss.alpha, cfg.loss.beta) == (0.5, 0.01)
    assert cfg.loss.lambdas == (1.0, 0.1, 1.0, 1.0, 0.1, 0.1)
    assert (cfg.train.lr, cfg.train.lr_min, cfg.train.betas, cfg.train.eps) == (1e-4, 1e-8, (0.9, 0.99), 1e-8)
    assert (cfg.train.batch_size, cfg.train.epochs) == (8, 30)
    # paper.yaml spells out every key: loading it equals the defaults
    assert cfg == Config()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load(name):
    load(name)


@pytest.mark.parametrize(
    "override, key, hint",
    [
        ("train.lrr=1", "train.lrr", "allowed keys here"),
        ("bogus.x=1", "bogus", "allowed keys here"),
        ("train.lr=abc", "train.lr", "valid number"),
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("train.zero_stage=2", "train.zero_stage", "not tested by this suite: use 0 or 1"),
        ("train.zero_stage=-1", "train.zero_stage", "greater than or equal to 0"),
        ("model.variant=4d", "model.variant", "'thin_slab' or '3d'"),
        ("train.precision=fp8", "train.precision", "'bf16', 'fp16' or 'fp32'"),
        ("loss.ssim_window=8", "loss", "odd"),
        ("data.patches.lr_size=[64]", "data.patches.lr_size", ""),
    ],
)
def test_bad_values_fail_naming_the_key(override, key, hint):
    with pytest.raises(ConfigError) as err:
        load("demo", [override])
    msg = str(err.value)
    assert f"'{key}" in msg and hint in msg


def test_zero_stage_and_cudnn_benchmark_follow_precision_and_determinism():
    # null: ZeRO 1 for the low precisions (DeepSpeed's flat optimizer), 0 for fp32 (torch Adam)
    assert [load("paper", [f"train.precision={p}"]).train.zero_stage for p in ("bf16", "fp16", "fp32")] == [1, 1, 0]
    assert load("paper", ["train.precision=fp32", "train.zero_stage=1"]).train.zero_stage == 1
    assert load("paper").train.cudnn_benchmark and not load("paper", ["train.deterministic=true"]).train.cudnn_benchmark
    with pytest.raises(ConfigError, match=r"'train.cudnn_benchmark'.*contradicts train.deterministic=true"):
        load("paper", ["train.deterministic=true", "train.cudnn_benchmark=true"])


def test_overrides_apply_with_yaml_types():
    cfg = load("demo", ["train.lr=3e-3", "data.patches.lr_size=[32, 48]", "model.variant=3d", "loss.adversarial=lsq"])
    assert cfg.train.lr == 0.003
    assert cfg.data.patches.lr_size == (32, 48)
    assert cfg.model.variant == "3d" and cfg.loss.adversarial == "lsq"


def test_x2_is_the_only_scale_and_the_infer_section_is_checked():
    with pytest.raises(ConfigError, match=r"data.degradation.*scale must be \[2, 2, 2\]"):
        load("demo", ["data.degradation.scale=[1,2,2]"])
    with pytest.raises(ConfigError, match="'infer.device'"):
        load("demo", ["infer.device=gpu"])
    cfg = load("demo", ["infer.batch_size=16", "infer.slab_overlap=1"])
    assert (cfg.infer.batch_size, cfg.infer.slab_overlap, cfg.infer.overlap) == (16, 1, 0.25)


def test_shipped_configs_resolve_by_name_and_by_their_old_location(tmp_path, monkeypatch):
    from udean.config import resolve_path

    monkeypatch.chdir(tmp_path)  # anywhere: the shipped configs are package data
    assert resolve_path("demo") == resolve_path("demo.yaml") == resolve_path("configs/demo.yaml") == CONFIG_DIR / "demo.yaml"
    with pytest.raises(ConfigError, match="not found"):
        resolve_path("elsewhere/demo.yaml")


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load(None, ["train.lr"])


def test_unknown_key_in_file_names_file_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="'train.epoch'.*allowed keys here: .*epochs"):
        load(p)


def test_resolved_config_round_trips(tmp_path):
    cfg = load("demo", ["train.seed=7"])
    save(cfg, tmp_path / "config.yaml")
    again = load(tmp_path / "config.yaml")
    assert again == cfg and again.hash() == cfg.hash()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 7


def test_cli_reports_config_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "udean", "train", "--config", "demo", "train.lr=-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "train.lr" in r.stderr and "Traceback" not in r.stderr
