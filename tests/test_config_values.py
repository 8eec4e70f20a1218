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
    ("teacher.model_kwargs", "{img_size: 32}", "teacher.model_kwargs must not set 'img_size'"),
    ("teacher.model_kwargs", "{num_classes: 5}", "teacher.ignore_head"),
])
def test_model_kwargs_may_not_set_what_another_option_sets(key, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        config(**{key: kwargs})

