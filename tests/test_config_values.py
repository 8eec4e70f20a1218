"""Config values a user gets wrong: each is refused before any work starts, naming the key and the fix."""
import pytest

from vitlinearizer.config import ConfigError, build_config, merge


def config(**overrides):
    return build_config(merge({}, overrides))


def test_model_kwargs_without_a_space_after_the_colon_are_refused():
    # YAML reads {patch_size:4} as the key 'patch_size:4' with no value, which timm drops silently.
    with pytest.raises(ConfigError, match=r"'patch_size:4' is a key without a value.*\{patch_size: 4, depth: 2\}"):
        config(**{"teacher.model_kwargs": "{patch_size:4,depth:2}"})
    assert config(**{"teacher.model_kwargs": "{patch_size: 4, depth: 2}"}).teacher.model_kwargs == {
        "patch_size": 4, "depth": 2}
    assert config(**{"student.model_kwargs": "{mixer_kwargs: {d_conv: 1}}"}).student.model_kwargs == {
        "mixer_kwargs": {"d_conv": 1}}


@pytest.mark.parametrize("key,kwargs,message", [
    ("student.model_kwargs", "{mixer: gla}", "must not set 'mixer': use student.mixer"),
    ("student.model_kwargs", "{img_size: 32}", "must not set 'img_size': use data.img_size"),
    ("student.model_kwargs", "{num_classes: 5}", "must not set 'num_classes'"),
    ("student.model_kwargs", "{drop_path_rate: 0.1}", "use student.drop_path_rate"),
    ("student.model_kwargs", "{grad_checkpointing: true}", "use student.grad_checkpointing"),
    ("teacher.model_kwargs", "{img_size: 32}", "teacher.model_kwargs must not set 'img_size'"),
    ("teacher.model_kwargs", "{num_classes: 5}", "teacher.ignore_head"),
])
def test_model_kwargs_may_not_set_what_another_option_sets(key, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        config(**{key: kwargs})



def test_sizes_and_grey_statistics_read_alike_in_yaml_and_on_the_command_line():
    from_flags = config(**{"data.img_size": "32x48", "data.mean": "0.5", "data.std": "0.25"}).data
    from_yaml = build_config({"data": {"img_size": "32x48", "mean": 0.5, "std": 0.25}}).data
    assert from_flags.img_size == from_yaml.img_size == (32, 48)
    assert from_flags.mean == from_yaml.mean == (0.5,) * 3 and from_yaml.std == (0.25,) * 3
    with pytest.raises(ConfigError, match=r"img_size must be a positive int, a pair \[H, W\] of positive ints or 'HxW'"):
        config(**{"data.img_size": "32x"})


def test_errors_name_the_option_as_the_user_writes_it():
    with pytest.raises(ConfigError, match=r"^train.epochs must be an integer >= 1, got 0"):
        config(**{"train.epochs": "0"})


def test_switches_read_alike_in_yaml_and_on_the_command_line():
    for value in (1, "1", True, "true", "yes"):
        assert build_config({"train": {"progress": value}}).train.progress is True
    for value in (0, "0", False, "false", "no"):
        assert build_config({"train": {"progress": value}}).train.progress is False
    for value in (2, -1, 0.5, "maybe"):
        with pytest.raises(ConfigError, match="train.progress expects true or false"):
            build_config({"train": {"progress": value}})


def test_kd_weight_above_one_is_refused_before_any_work():
    # (1 - kd_weight) weighs the cross-entropy: above 1 training would push the labels' loss up.
    with pytest.raises(ConfigError, match=r"finetune.kd_weight must be in \[0, 1\], got 1.5"):
        config(**{"finetune.kd_weight": "1.5"})
    assert config(**{"finetune.kd_weight": "1"}).finetune.kd_weight == 1.0
