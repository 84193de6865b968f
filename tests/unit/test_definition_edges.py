"""Definition rules nothing pinned before the mutation run (issue 10): policy facts (topic,
tags), boundaries of timeout and retries, hooks (refresh, releasers, helpers) and the exact
messages an author reads when a declaration is refused."""

from __future__ import annotations

from typing import Any

import pytest

from sagaq.definition import Registry, Saga
from sagaq.errors import DefinitionError

SAGA = "orders"


def _noop(ctx: Any, inp: Any) -> None:
    return None


class Nameless:
    """A callable without ``__name__`` (like a functools.partial or a bound instance)."""

    def __call__(self, *args: Any) -> None:
        return None


def new_saga() -> Saga:
    return Saga(SAGA, registry=Registry())


def refused(call: Any) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        call()
    return info.value


# -- policy facts --------------------------------------------------------------------------

TOPIC_RULE = "topic must be a non-empty text, e.g. 'infra.delete'"
TAGS_RULE = "tags is a tuple of non-empty texts"


@pytest.mark.parametrize(("options", "rule"), [
    pytest.param({"topic": ""}, TOPIC_RULE, id="topic-empty"),
    pytest.param({"topic": 3}, TOPIC_RULE, id="topic-a-number"),
    pytest.param({"topic": ("infra", "delete")}, TOPIC_RULE, id="topic-a-tuple"),
    pytest.param({"tags": "payments"}, TAGS_RULE, id="tags-a-string"),
    pytest.param({"tags": ("payments", "")}, TAGS_RULE, id="tags-an-empty-one"),
    pytest.param({"tags": ("payments", 3)}, TAGS_RULE, id="tags-a-number"),
    pytest.param({"tags": (None,)}, TAGS_RULE, id="tags-a-none"),
])
def test_bad_policy_facts_are_refused_naming_saga_step_and_rule(
    options: dict[str, Any], rule: str
) -> None:
    saga = new_saga()
    err = refused(lambda: saga.step(name="wipe", side_effect=False, **options)(_noop))
    assert (err.saga, err.step, err.rule) == (SAGA, "wipe", rule)
    assert str(err) == f"saga {SAGA!r}, step 'wipe': {rule}"
    assert repr(saga) == "<Saga orders steps=[]>"  # nothing was added


def test_policy_facts_are_kept_from_the_decorator() -> None:
    saga = new_saga()
    saga.step(name="a", side_effect=False, topic="infra.delete", tags=["prod", "payments"])(_noop)
    saga.step(name="b", side_effect=False, tags=None)(_noop)  # type: ignore[arg-type]
    saga.step(name="c", side_effect=False)(_noop)
    a, b, c = saga.steps
    assert (a.topic, a.tags) == ("infra.delete", ("prod", "payments"))
    assert isinstance(a.tags, tuple)
    assert (b.topic, b.tags) == (None, ())
    assert (c.topic, c.tags) == (None, ())


# -- boundaries ----------------------------------------------------------------------------

TIMEOUT_RULE = "timeout must be a positive number of seconds"


@pytest.mark.parametrize("timeout", [0.5, 1, 0.001, 3600])
def test_any_positive_timeout_is_accepted(timeout: float) -> None:
    saga = new_saga()
    saga.step(name="a", side_effect=False, timeout=timeout)(_noop)
    assert saga.steps[0].timeout == timeout


@pytest.mark.parametrize("timeout", [0, 0.0, -0.5, -1, None])
def test_a_timeout_that_is_not_positive_is_refused(timeout: float | None) -> None:
    saga = new_saga()
    if timeout is None:  # None means "the settings' default": accepted
        saga.step(name="a", side_effect=False, timeout=timeout)(_noop)
        assert saga.steps[0].timeout is None
        return
    err = refused(lambda: saga.step(name="a", side_effect=False, timeout=timeout)(_noop))
    assert (err.step, err.rule) == ("a", TIMEOUT_RULE)


def test_zero_retries_are_accepted() -> None:
    saga = new_saga()
    saga.step(name="a", side_effect=False, retries=0)(_noop)
    assert saga.steps[0].retries == 0


@pytest.mark.parametrize(("option", "rule"), [
    ("retries", "retries must be a whole number >= 0"),
    ("timeout", TIMEOUT_RULE),
])
def test_a_bool_is_not_a_count_nor_a_duration(option: str, rule: str) -> None:
    # Python counts True as 1: retries=True would mean one retry, timeout=True one second.
    saga = new_saga()
    err = refused(lambda: saga.step(name="a", side_effect=False, **{option: True})(_noop))
    assert (err.step, err.rule) == ("a", rule)


# -- side effects by default -----------------------------------------------------------------


def test_a_step_declared_without_saying_has_side_effects() -> None:
    # side_effect defaults to True even when the option is not passed at all.
    saga = new_saga()
    err = refused(lambda: saga._add("a", _noop, kind="compensable", compensate=None,
                                    verify=None))
    assert err.rule.startswith("a step with side effects needs compensate=...")


# -- names ---------------------------------------------------------------------------------


def test_a_nameless_callable_needs_an_explicit_step_name() -> None:
    saga = new_saga()
    err = refused(lambda: saga.step(side_effect=False)(Nameless()))
    assert (err.saga, err.step) == (SAGA, None)
    assert str(err) == f"saga {SAGA!r}: a step name is letters, digits and underscores"
    saga.step(name="named", side_effect=False)(Nameless())
    assert [s.name for s in saga.steps] == ["named"]


def test_a_non_callable_action_is_refused_naming_the_saga() -> None:
    saga = new_saga()
    err = refused(lambda: saga._add("a", "text", kind="compensable",  # type: ignore[arg-type]
                                    compensate=None, verify=None, side_effect=False))
    assert str(err) == f"saga {SAGA!r}, step 'a': the step's action is not callable"


@pytest.mark.parametrize("helper", [Nameless(), lambda ctx, inp: None, "undo"])
def test_a_helper_must_be_a_named_function(helper: Any) -> None:
    saga = new_saga()
    err = refused(lambda: saga.compensation(helper))
    assert (err.saga, err.step) == (SAGA, None)
    assert err.rule == f"{helper!r} is not a named function"
    err = refused(lambda: saga.verifier(helper))
    assert err.saga == SAGA


def test_two_helpers_of_one_name_are_refused_naming_the_saga() -> None:
    saga = new_saga()

    def undo(ctx: Any, inp: Any) -> None:
        return None

    saga.compensation(undo)
    saga.compensation(undo)  # the same function twice is fine
    other = _rename(_noop, "undo")
    err = refused(lambda: saga.compensation(other))
    assert str(err) == f"saga {SAGA!r}: two helpers are named 'undo'"


def _rename(fn: Any, name: str) -> Any:
    def renamed(ctx: Any, inp: Any) -> None:
        return fn(ctx, inp)

    renamed.__name__ = name
    return renamed


# -- helpers resolved at seal ----------------------------------------------------------------


@pytest.mark.parametrize(("option", "what"), [("compensate", "compensation"),
                                              ("verify", "verifier")])
def test_a_helper_that_is_neither_a_name_nor_callable_fails_at_seal(
    option: str, what: str
) -> None:
    saga = new_saga()
    extra = {} if option == "compensate" else {"compensate": _noop}
    saga.step(name="a", **{option: 42}, **extra)(_noop)
    err = refused(saga.seal)
    assert (err.saga, err.step) == (SAGA, "a")
    assert err.rule == f"{what} 42 is neither a name nor callable"


def test_a_nameless_helper_is_named_after_its_role() -> None:
    saga = new_saga()
    saga.step(name="a", compensate=Nameless(), verify=Nameless())(_noop)
    (a,) = saga.steps
    assert (a.compensate_name, a.verify_name) == ("compensation", "verifier")
    assert a.compensate_task_name == "sagaq.orders.a.compensate"


# -- hooks ---------------------------------------------------------------------------------


def test_a_new_saga_has_no_refresh_hook_and_no_releasers() -> None:
    saga = new_saga()
    assert saga.refresh_hook is None
    assert saga.releasers == {}


def test_the_refresh_hook_is_kept_and_must_be_callable() -> None:
    saga = new_saga()
    assert saga.refresh(_noop) is _noop
    assert saga.refresh_hook is _noop
    err = refused(lambda: saga.refresh("reload"))  # type: ignore[arg-type]
    assert str(err) == f"saga {SAGA!r}: the refresh hook must be callable"
    assert (err.saga, err.step) == (SAGA, None)
    assert saga.refresh_hook is _noop  # the bad one did not replace it


def test_releasers_are_kept_by_kind() -> None:
    saga = new_saga()

    def release_vm(ctx: Any) -> None:
        return None

    assert saga.releaser("vm")(release_vm) is release_vm
    assert saga.releasers == {"vm": release_vm}


@pytest.mark.parametrize("kind", ["", 3, None])
def test_a_releaser_needs_a_kind(kind: Any) -> None:
    saga = new_saga()
    err = refused(lambda: saga.releaser(kind))
    assert str(err) == f"saga {SAGA!r}: a releaser needs a resource kind"
    assert (err.saga, err.step) == (SAGA, None)


def test_a_releaser_must_be_callable() -> None:
    saga = new_saga()
    err = refused(lambda: saga.releaser("vm")("release_vm"))  # type: ignore[arg-type]
    assert str(err) == f"saga {SAGA!r}: the releaser of 'vm' is not callable"
    assert (err.saga, err.step) == (SAGA, None)
    assert saga.releasers == {}


# -- classifiers -----------------------------------------------------------------------------


def test_the_classifier_rule_says_what_a_classifier_is() -> None:
    saga = new_saga()
    err = refused(lambda: saga.step(name="a", side_effect=False, classify=42)(_noop))
    assert err.rule == ("classify takes a function (or a tuple of them) mapping an exception "
                        "to a FailureClass or None")


def test_a_saga_joins_the_process_registry_unless_given_another() -> None:
    from sagaq.definition import sagas

    name = "joins_the_process_registry"
    saga = Saga(name)
    try:
        assert name in sagas
        assert sagas.get(name) is saga
    finally:
        sagas._sagas.pop(name, None)  # leave the process registry as it was
