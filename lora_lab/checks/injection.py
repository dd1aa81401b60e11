"""Grader of notebook 02's ``apply_lora_to_model`` exercise: adapt every ``nn.Linear`` of a copy.

The student's ``fn(model, rank, alpha)`` must return a deep copy in which every ``nn.Linear``, at
any depth, is wrapped in a LoRA layer (a module with ``original_layer`` and ``lora`` holding
``lora_A``/``lora_B``), with only A and B trainable, the original model untouched, and no adapter
put on an adapter. The graded models are small and built here: an embedding, LayerNorms and linear
layers nested three deep in a ``ModuleList`` and ``nn.Sequential``, so that a missing recursion, a
forgotten freeze or a shared submodule each shows.

``layer_class`` (e.g. ``lora_lab.LoRALinear``): while the check runs, the name ``LoRALinear`` in the
namespace where ``fn`` was defined means ``layer_class``, so the function is graded on a correct
wrapper and a mistake in the student's own ``LoRALinear`` (another exercise) is not counted twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .lora_linear import _global_bound
from .result import CheckResult, _attempt, _name, _run_check, _title

WRAPPER_NAME = "LoRALinear"
_RANK, _ALPHA = 2, 6.0


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _TinyLM(nn.Module):
    """Embedding → two residual blocks (LayerNorm, a two-layer MLP) → head: the GPT's nesting in small."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([_Block(width), _Block(width)])
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _is_wrapper(module: nn.Module) -> bool:
    """A LoRA wrapper by the course's attributes, whichever class built it."""
    lora = getattr(module, "lora", None)
    return isinstance(getattr(module, "original_layer", None), nn.Module) and hasattr(lora, "lora_A")


def _fingerprint(model: nn.Module) -> tuple[list, list, dict]:
    """What must not change in the original: its modules' names and types, flags and values."""
    layout = [(name, type(m)) for name, m in model.named_modules()]
    flags = [(name, p.requires_grad) for name, p in model.named_parameters()]
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return layout, flags, values


def _same(model: nn.Module, fingerprint: tuple[list, list, dict]) -> bool:
    layout, flags, values = _fingerprint(model)
    return (
        (layout, flags) == fingerprint[:2]
        and values.keys() == fingerprint[2].keys()
        and all(torch.equal(v, fingerprint[2][k]) for k, v in values.items())
    )


def check_apply_lora(
    fn: Callable[..., nn.Module],
    rank: int = _RANK,
    alpha: float = _ALPHA,
    *,
    layer_class: type[nn.Module] | None = None,
) -> CheckResult:
    """Check ``fn(model, rank=rank, alpha=alpha)``, the course's ``apply_lora_to_model``.

    Properties: it returns a new model (not ``None``, not the model itself) and leaves the
    original untouched (modules, values, ``requires_grad``; a missing deep copy is named); every
    ``nn.Linear`` at any depth is wrapped (missing nested layers name the recursion), with the given
    rank and α, the very weights of the copy kept; only ``lora_A`` and ``lora_B`` require grad
    (an embedding or LayerNorm left trainable is named); the adapted model computes the base's
    function at init; applied again to its own result it wraps no adapter's inner ``nn.Linear``
    and no adapter (or it refuses with an exception).
    """
    title = _title("check_apply_lora", fn, "fn")
    if layer_class is not None:
        title = f"{title[:-1]}, on {getattr(layer_class, '__module__', '?')}.{_name(layer_class, 'layer_class')})"
    with _global_bound(getattr(fn, "__globals__", None), WRAPPER_NAME, layer_class):
        return _run_check(title, _check_apply_lora, fn, rank, alpha, layer_class)


def _check_apply_lora(
    result: CheckResult,
    fn: Callable,
    rank: int,
    alpha: float,
    layer_class: type[nn.Module] | None,
    generator: torch.Generator,
) -> None:
    model = _TinyLM()
    fingerprint = _fingerprint(model)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    tokens = torch.randint(0, 11, (2, 5), generator=generator)
    with torch.no_grad():
        expected = model(tokens)
    error, adapted = _attempt(fn, model, rank=rank, alpha=alpha)
    if error is not None:
        if error.startswith("raised RecursionError"):
            result.fail(
                f"fn(model, rank={rank}, alpha={alpha:g}) never ends: adapters on adapters, wrapped again and again",
                "a new wrapper's original_layer is an nn.Linear again: do not recurse into a layer you have just "
                "wrapped (recurse only into children that are not nn.Linear)",
            )
            return
        result.fail(
            f"fn(model, rank={rank}, alpha={alpha:g}) {error}",
            f"copy the model, then replace each nn.Linear by {WRAPPER_NAME}(layer, rank=rank, alpha=alpha)",
        )
        return
    if not _returned_a_copy(result, model, adapted, fingerprint):
        return
    if not _wrapped_everywhere(result, adapted, linears, rank, alpha, layer_class):
        return
    _only_factors_train(result, adapted)
    try:
        with torch.no_grad():
            same = torch.equal(adapted(tokens), expected)
    except Exception as error:  # the student's model may raise anything
        result.fail(
            f"the adapted model's forward raised {type(error).__name__}: {error}",
            "replace modules, do not change how the model calls them",
        )
        return
    if same:
        result.ok("at init (B = 0) the adapted model computes exactly the original's outputs")
    else:
        result.fail(
            "at init the adapted model's outputs differ from the original's",
            "wrap each layer as it is (its own weights), and keep B = 0 at init",
        )
    _no_adapter_on_adapter(result, fn, adapted, len(linears), rank, alpha)


def _returned_a_copy(result: CheckResult, model: nn.Module, adapted: object, fingerprint: tuple) -> bool:
    if adapted is None:
        result.fail("fn returned None", "return the adapted copy (the course's apply_lora_to_model returns a model)")
        return False
    if not isinstance(adapted, nn.Module):
        result.fail(f"fn returned a {type(adapted).__name__}, not an nn.Module", "return the adapted copy")
        return False
    if adapted is model:
        result.fail(
            "fn returned the model it was given, adapted in place: the original base model is lost",
            "start from copy.deepcopy(model) and adapt the copy",
        )
        return False
    if not _same(model, fingerprint):
        result.fail(
            "fn changed the original model (its layers, weights or requires_grad flags): the copy shares modules "
            "with it",
            "copy.deepcopy(model) copies every submodule; copy.copy or a new container around the same layers does not",
        )
        return False
    shared = {id(p) for p in model.parameters()} & {id(p) for p in adapted.parameters()}
    if shared:
        result.fail(
            f"the adapted model shares {len(shared)} parameter tensors with the original",
            "adapt copy.deepcopy(model), not the original's layers",
        )
        return False
    result.ok("returns a new model and leaves the original untouched (layers, weights, requires_grad)")
    return True


def _wrapped_everywhere(
    result: CheckResult,
    adapted: nn.Module,
    linears: list[str],
    rank: int,
    alpha: float,
    layer_class: type[nn.Module] | None,
) -> bool:
    found = {}
    for name in linears:
        try:
            found[name] = adapted.get_submodule(name)
        except AttributeError:
            found[name] = None
    missing = [name for name, m in found.items() if not _is_wrapper(m)]
    if missing:
        nested = all("." in name for name in missing)
        result.fail(
            f"{len(missing)} of {len(linears)} nn.Linear layers are not wrapped: {', '.join(missing)}",
            "recurse into every child that is not an nn.Linear: layers sit inside blocks and nn.Sequential"
            if nested
            else f"replace each nn.Linear by {WRAPPER_NAME}(layer, rank=rank, alpha=alpha)",
        )
        return False
    foreign = sorted(
        {type(m).__name__ for m in found.values() if layer_class is not None and type(m) is not layer_class}
    )
    if foreign:
        result.fail(
            f"the layers are wrapped in {', '.join(foreign)}, not in {WRAPPER_NAME}: fn did not build the wrappers",
            f"build each wrapper yourself with {WRAPPER_NAME}(layer, rank=rank, alpha=alpha); calling lora_lab's "
            "apply_lora_to_model skips the exercise",
        )
        return False
    nested = [name for name, m in found.items() if _is_wrapper(m.original_layer)]
    if nested:
        result.fail(
            f"adapters on adapters: the wrapper's original_layer is itself a wrapper at {', '.join(nested)}",
            "wrap each nn.Linear once; do not recurse into a layer you have just wrapped (its original_layer is an "
            "nn.Linear too)",
        )
        return False
    stray = [n for n, m in adapted.named_modules() if isinstance(m, nn.Linear) and not n.endswith("original_layer")]
    if stray:
        result.fail(f"nn.Linear layers left unwrapped: {', '.join(stray)}", "wrap every nn.Linear")
        return False
    ranks = {m.lora.lora_A.shape[0] for m in found.values()}
    scalings = {round(float(getattr(m.lora, "scaling", alpha / rank)), 9) for m in found.values()}
    if ranks != {rank} or scalings != {round(alpha / rank, 9)}:
        result.fail(
            f"the adapters have rank {sorted(ranks)} and scaling {sorted(scalings)}, expected rank {rank} and "
            f"α/r = {alpha / rank:g}",
            "pass rank and alpha on to every wrapper (and to the recursive call)",
        )
        return False
    result.ok(f"every nn.Linear, nested up to three deep, is wrapped once, with rank {rank} and α = {alpha:g}")
    return True


def _only_factors_train(result: CheckResult, adapted: nn.Module) -> None:
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    others = sorted({name for name in trainable if name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")})
    factors = [name for name, _ in adapted.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]
    if others:
        result.fail(
            f"besides A and B, {len(others)} parameters still train: {', '.join(others[:4])}"
            + (", …" if len(others) > 4 else ""),
            "the wrapper freezes only its own layer: after wrapping, set requires_grad = False on every parameter "
            "whose name does not end in lora_A or lora_B (the course's slip, section 9)",
        )
    elif sorted(trainable) != sorted(factors):
        result.fail("some lora_A or lora_B do not require grad", "freeze everything except the adapters' A and B")
    else:
        result.ok("only lora_A and lora_B require grad (embedding, LayerNorms and biases frozen)")


def _no_adapter_on_adapter(
    result: CheckResult, fn: Callable, adapted: nn.Module, count: int, rank: int, alpha: float
) -> None:
    error, again = _attempt(fn, adapted, rank=rank, alpha=alpha)
    if error is not None:
        result.ok(f"applied to an adapted model, it refuses ({error.removeprefix('raised ')})")
        return
    if not isinstance(again, nn.Module):
        result.fail(f"applied to an adapted model, fn returned {type(again).__name__}", "return the copy")
        return
    wrappers = [m for m in again.modules() if _is_wrapper(m)]
    inner = [m for m in wrappers if _is_wrapper(m.original_layer) or isinstance(m.original_layer, type(None))]
    if len(wrappers) == count and not inner:
        result.ok("applied to an adapted model, it leaves the adapters as they are (no adapter on an adapter)")
    else:
        result.fail(
            f"applied to its own result, fn gives {len(wrappers)} adapters for {count} nn.Linear layers: it wrapped "
            "the adapters' inner original_layer or the adapters themselves",
            f"skip modules that are already a {WRAPPER_NAME} (check isinstance before recursing into a child)",
        )
