"""The experiment's configuration: nested, typed, overridable by dotted name, with the sizes the
issue and the course ask for."""

from __future__ import annotations

import dataclasses

import pytest

from lora_lab.data.grammar import builtin_corpus
from lora_lab.experiment.config import (
    COURSE_BUDGET_RECIPE,
    COURSE_RECIPE,
    PROFILES,
    TUNED_RECIPE,
    LoRARecipe,
    Profile,
    get_profile,
    parse_overrides,
    with_overrides,
)
from lora_lab.model import parameter_count


@pytest.mark.parametrize("vocab", [len(set(builtin_corpus().text)), 65])  # built-in corpus; Tiny Shakespeare
def test_course_profile_model_has_about_8_2m_parameters(vocab: int):
    config = PROFILES["course"].model.gpt_config(vocab)
    assert abs(parameter_count(config) / 8.2e6 - 1) <= 0.01  # config.py: within 1%


def test_course_profile_keeps_the_course_recipe():
    p = PROFILES["course"]
    assert (p.pretrain.epochs, p.pretrain.lr) == (10.0, 1e-2)
    course = p.recipe(COURSE_RECIPE)
    assert (course.rank, course.alpha, course.lr, p.finetune.epochs) == (4, 1.0, 1e-3, 5.0)


def test_profiles_are_ordered_by_cost():
    sizes = [parameter_count(PROFILES[name].model.gpt_config(31)) for name in ("smoke", "cpu", "course")]
    assert sizes == sorted(sizes) and sizes[0] < 100_000


def test_every_profile_runs_the_course_and_the_tuned_recipe():
    for profile in PROFILES.values():
        names = [r.name for r in profile.recipes]
        # the cpu profile's budget is 30 epochs: there the course's recipe also runs at the course's 5
        extra = [COURSE_BUDGET_RECIPE] if profile.name == "cpu" else []
        assert names == [COURSE_RECIPE, *extra, TUNED_RECIPE], profile.name
    course_5ep = PROFILES["cpu"].recipe(COURSE_BUDGET_RECIPE)
    assert dataclasses.replace(course_5ep, name=COURSE_RECIPE, epochs=None) == PROFILES["cpu"].recipe(COURSE_RECIPE)
    assert course_5ep.epochs == 5.0


def test_the_word_seed_means_the_random_seed_only():
    assert "seed" not in PROFILES and all("seed" not in r.name for p in PROFILES.values() for r in p.recipes)
    assert get_profile("cpu", {"seed": 3}).seed == 3


def test_override_replaces_one_nested_field_and_validates():
    p = get_profile("cpu", {"pretrain.epochs": 2})
    assert p.pretrain.epochs == 2 and p.pretrain.lr == PROFILES["cpu"].pretrain.lr and p.model == PROFILES["cpu"].model
    assert PROFILES["cpu"].pretrain.epochs == 8.0  # the registered profile is untouched
    with pytest.raises(ValueError, match="pretrain.lr must be a positive finite number"):
        get_profile("cpu", {"pretrain.lr": 0})
    with pytest.raises(ValueError, match="unknown profile field 'learning_rate'; fields are: .*pretrain.epochs"):
        get_profile("cpu", {"learning_rate": 1})
    divisible = r"profile section model: GPTConfig.n_embd \(32\) must be divisible by n_head \(3\)"
    with pytest.raises(ValueError, match=divisible):
        get_profile("smoke", {"model.n_head": 3})
    with pytest.raises(ValueError, match="'pretrain' is a section; set one of its fields, e.g. pretrain.epochs"):
        get_profile("cpu", {"pretrain": 2})


def test_a_recipe_is_overridden_by_its_name():
    p = get_profile("cpu", {"recipes.lora.rank": "8", "recipes.lora.target_modules": "q, v"})
    tuned = p.recipe(TUNED_RECIPE)
    assert (tuned.rank, tuned.target_modules) == (8, ("q", "v"))
    assert p.recipe(COURSE_RECIPE) == PROFILES["cpu"].recipe(COURSE_RECIPE)
    recipes = "lora_course, lora_course_5ep, lora"
    with pytest.raises(ValueError, match=f"profile 'cpu' has no recipe 'lora_big'; its recipes are: {recipes}"):
        get_profile("cpu", {"recipes.lora_big.rank": 8})
    with pytest.raises(ValueError, match="recipes.lora.use_rslora: 'yes' is not true or false"):
        get_profile("cpu", {"recipes.lora.use_rslora": "yes"})
    assert get_profile("cpu", {"recipes.lora.use_rslora": "True"}).recipe("lora").use_rslora is True


def test_text_values_are_parsed_by_the_declared_type():
    p = get_profile("cpu", parse_overrides(["model.n_layer=3", "builtin_chars=none", "full.lr=3e-3"]))
    assert (p.model.n_layer, p.builtin_chars, p.full.lr) == (3, None, 3e-3)
    assert type(p.model.n_layer) is int and type(p.full.lr) is float
    with pytest.raises(ValueError, match="model.n_layer: 'two' is not an int"):
        get_profile("cpu", parse_overrides(["model.n_layer=two"]))
    with pytest.raises(ValueError, match="full.lr: 'nan' is not a finite number"):
        get_profile("cpu", parse_overrides(["full.lr=nan"]))
    with pytest.raises(ValueError, match="--set expects FIELD=VALUE"):
        parse_overrides(["pretrain.epochs"])


def test_recipes_are_validated_and_their_name_is_a_label():
    with pytest.raises(ValueError, match="recipes.x.rank must be a positive int"):
        LoRARecipe("x", rank=0, alpha=1.0, lr=1e-3)
    with pytest.raises(TypeError, match="use_rslora must be True or False"):
        LoRARecipe("x", 4, 1.0, 1e-3, use_rslora="no")
    with pytest.raises(ValueError, match="target_modules must be a tuple of module names"):
        LoRARecipe("x", 4, 1.0, 1e-3, target_modules="q")
    a, b = LoRARecipe("a", 4, 1.0, 1e-3, ("q",)), LoRARecipe("b", 4, 1.0, 1e-3, ["q"])
    assert a.settings() == b.settings() and a.to_dict()["name"] == "a"
    with pytest.raises(ValueError, match="recipe names must be distinct"):
        Profile(name="x", model=PROFILES["smoke"].model, recipes=(a, a))
    with pytest.raises(TypeError, match="with_overrides needs a Profile"):
        with_overrides("cpu", {})
