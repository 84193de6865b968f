"""The public surface: what ``import sagaq`` offers, and the error hierarchy."""

from __future__ import annotations

import importlib.metadata
import inspect
import re

import pytest
from celery import Celery

import sagaq
from sagaq import errors

EXPECTED_ALL = [
    "ConfigurationError",
    "DatabaseUnavailable",
    "DefinitionError",
    "Direction",
    "EnvironmentalError",
    "IllegalTransition",
    "InputError",
    "LogicalError",
    "Registry",
    "Runtime",
    "Saga",
    "SagaState",
    "SagaqError",
    "Secret",
    "Settings",
    "Step",
    "StepContext",
    "StepError",
    "StepKind",
    "StepStatus",
    "TerminalError",
    "TransientError",
    "UnknownSagaError",
    "__version__",
    "configure",
    "default_runtime",
    "enqueue",
    "sagas",
]


def test_all_is_pinned_and_sorted() -> None:
    assert sagaq.__all__ == EXPECTED_ALL
    assert sorted(sagaq.__all__) == sagaq.__all__
    assert len(set(sagaq.__all__)) == len(sagaq.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(sagaq, name) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from sagaq import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(EXPECTED_ALL)


def test_version_matches_the_installed_distribution() -> None:
    assert sagaq.__version__ == importlib.metadata.version("sagaq")


@pytest.mark.parametrize("attr", ["app", "celery"])
def test_no_celery_app_on_the_package(attr: str) -> None:
    # `celery -A sagaq` must find the app in the sagaq.celery module (built from SAGAQ_*),
    # not an attribute of the package that importing sagaq would have to build.
    assert not isinstance(getattr(sagaq, attr, None), Celery)


def test_public_errors_are_the_errors_module() -> None:
    for name in EXPECTED_ALL:
        obj = getattr(sagaq, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert obj is getattr(errors, name)


# -- errors ------------------------------------------------------------------------------

ERROR_CLASSES = {
    name: cls
    for name, cls in vars(errors).items()
    if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__
}


def test_the_errors_module_defines_the_expected_classes() -> None:
    assert sorted(ERROR_CLASSES) == [
        "ConfigurationError",
        "DatabaseUnavailable",
        "DefinitionError",
        "EnvironmentalError",
        "IllegalTransition",
        "InputError",
        "LogicalError",
        "SagaqError",
        "StepError",
        "TerminalError",
        "TransientError",
        "UnknownSagaError",
    ]


@pytest.mark.parametrize("name", sorted(ERROR_CLASSES))
def test_every_error_subclasses_sagaq_error(name: str) -> None:
    assert issubclass(ERROR_CLASSES[name], errors.SagaqError)


@pytest.mark.parametrize("name", sorted(ERROR_CLASSES))
def test_every_error_is_exported(name: str) -> None:
    assert name in sagaq.__all__


def test_definition_error_carries_saga_step_rule() -> None:
    err = errors.DefinitionError("orders", "charge", "a saga has at most one pivot")
    assert (err.saga, err.step, err.rule) == ("orders", "charge", "a saga has at most one pivot")
    assert str(err) == "saga 'orders', step 'charge': a saga has at most one pivot"
    assert err.message == str(err)
    bare = errors.DefinitionError("orders", None, "a saga needs at least one step")
    assert (bare.saga, bare.step) == ("orders", None)
    assert str(bare) == "saga 'orders': a saga needs at least one step"


def test_sagaq_error_context_attributes() -> None:
    err = errors.UnknownSagaError("no such saga", saga="x", saga_id="id-1", step="s")
    assert (err.message, err.saga, err.saga_id, err.step) == ("no such saga", "x", "id-1", "s")


def test_step_error_defaults_its_message_to_the_class_name() -> None:
    assert str(errors.TerminalError()) == "TerminalError"
    assert str(errors.TransientError("429", step="charge")) == "429"
    assert errors.TransientError("429", step="charge").step == "charge"


def test_illegal_transition_attributes() -> None:
    err = errors.IllegalTransition("finish", "pending", saga_id="id-1")
    assert (err.trigger, err.state, err.saga_id) == ("finish", "pending", "id-1")
    assert str(err) == "cannot 'finish' a saga in state 'pending'"


def _drawn_hierarchy(doc: str) -> dict[str, str | None]:
    """child -> parent, read from the box-drawing tree in the module docstring."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        m = re.match(r"^([\s│]*(?:[├└]──\s+)?)([A-Z]\w+)(\s|$)", line)
        if not m or not (m[1].strip() or m[2] == "SagaqError"):
            continue
        column = len(m[1])
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[m[2]] = stack[-1][1] if stack else None
        stack.append((column, m[2]))
    return parents


def test_docstring_names_every_error_class() -> None:
    doc = errors.__doc__ or ""
    for name in ERROR_CLASSES:
        assert re.search(rf"\b{name}\b", doc), f"sagaq/errors.py docstring does not draw {name}"


def test_docstring_tree_matches_the_class_hierarchy() -> None:
    drawn = _drawn_hierarchy(errors.__doc__ or "")
    assert set(drawn) == set(ERROR_CLASSES)
    for child, parent in drawn.items():
        bases = ERROR_CLASSES[child].__bases__
        expected = (Exception,) if parent is None else (ERROR_CLASSES[parent],)
        assert bases == expected, f"{child} is drawn under {parent} but subclasses {bases}"


def test_tree_parser() -> None:
    doc = "x\n\n    Root\n    ├── Alpha     text\n    │   └── Beta\n    └── Gamma\n"
    # "Root" is not SagaqError, so only drawn children count; parents follow the indentation.
    assert _drawn_hierarchy(doc) == {"Alpha": None, "Beta": "Alpha", "Gamma": None}
    doc = "    SagaqError\n    ├── Alpha\n    │   └── Beta\n    └── Gamma\n"
    assert _drawn_hierarchy(doc) == {
        "SagaqError": None,
        "Alpha": "SagaqError",
        "Beta": "Alpha",
        "Gamma": "SagaqError",
    }
