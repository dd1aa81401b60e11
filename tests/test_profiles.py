"""Profiles are plain data with the sizes the issue and the seed ask for."""

from __future__ import annotations

import pytest

from lora_lab.corpus import builtin_corpus
from lora_lab.model import GPTConfig, parameter_count
from lora_lab.profiles import PROFILES, get_profile


def _config(name: str, vocab: int) -> GPTConfig:
    p = PROFILES[name]
    return GPTConfig(vocab_size=vocab, block_size=p.block_size, n_layer=p.n_layer, n_head=p.n_head, n_embd=p.n_embd)


@pytest.mark.parametrize("vocab", [len(set(builtin_corpus().text)), 65])  # built-in corpus; Tiny Shakespeare
def test_seed_profile_model_has_about_8_2m_parameters(vocab: int):
    assert abs(parameter_count(_config("seed", vocab)) / 8.2e6 - 1) <= 0.01  # profiles.py: within 1%


def test_seed_profile_keeps_the_seed_recipe():
    p = PROFILES["seed"]
    assert (p.pretrain_epochs, p.pretrain_lr) == (10.0, 1e-2)
    assert (p.lora_rank, p.lora_alpha, p.lora_lr, p.finetune_epochs) == (4, 1.0, 1e-3, 5.0)


def test_profiles_are_ordered_by_cost():
    sizes = [parameter_count(_config(name, 31)) for name in ("smoke", "cpu", "seed")]
    assert sizes == sorted(sizes) and sizes[0] < 100_000


def test_override_replaces_one_field_and_validates():
    p = get_profile("cpu", pretrain_epochs=2)
    assert p.pretrain_epochs == 2 and p.n_embd == PROFILES["cpu"].n_embd
    with pytest.raises(ValueError, match="pretrain_lr must be a positive number"):
        get_profile("cpu", pretrain_lr=0)
    with pytest.raises(ValueError, match="unknown profile field"):
        get_profile("cpu", learning_rate=1)
