"""Saga definitions: the order and contract rules, sealing, names, and the version hash."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sagaq.definition import Registry, Saga, Step, StepKind
from sagaq.errors import DefinitionError, UnknownSagaError
from sagaq.failures import FailureClass
from sagaq.ladder import Bounds

SAGA = "orders"


def _noop(ctx: Any, inp: Any) -> None:
    return None


def undo(ctx: Any, inp: Any) -> None:
    return None


def new_saga(name: str = SAGA) -> Saga:
    return Saga(name, registry=Registry())


def add(saga: Saga, name: str, **kw: Any) -> None:
    saga.step(name=name, **kw)(_noop)


# Step declarations by kind; "C" names a compensation resolved only at seal.
C: dict[str, Any] = {"kind": "compensable", "compensate": "undo"}
CN: dict[str, Any] = {"kind": "compensable", "no_rollback": "read-only mirror"}
P: dict[str, Any] = {"kind": "pivot"}
R: dict[str, Any] = {"kind": "retryable"}
N: dict[str, Any] = {"kind": "noncompensable"}

SIDE_EFFECT_RULE = (
    "a step with side effects needs compensate=... or no_rollback='reason' "
    "(or side_effect=False if it only reads)"
)
COMPENSABLE_FIRST = "compensable steps come before the pivot and any step that cannot be undone"
TIERS_RULE = "tiers is a tuple of tier names, small → large"
UNIQUE_TIERS_RULE = "tier names are unique and not 'fallback'"
RUNGS_RULE = "rungs names which of ladder rungs 0, 1, 2 apply"
LADDER_RULE = "ladder must be a sagaq.ladder.Bounds"

# (declared before, the failing step's name, its declaration, the exact rule)
ADD_FAILURES = [
    pytest.param(
        [("n", N)],
        "p",
        P,
        "the pivot comes before retryable and noncompensable steps",
        id="noncompensable-then-pivot",
    ),
    pytest.param([("n", N)], "c", C, COMPENSABLE_FIRST, id="noncompensable-then-compensable"),
    pytest.param([("p", P)], "c", C, COMPENSABLE_FIRST, id="pivot-then-compensable"),
    pytest.param([("p", P), ("r", R)], "c", CN, COMPENSABLE_FIRST, id="retryable-then-compensable"),
    pytest.param(
        [("p", P), ("n", N)],
        "r",
        R,
        "noncompensable steps come last",
        id="noncompensable-then-retryable",
    ),
    pytest.param([("p", P)], "p2", P, "a saga has at most one pivot", id="two-pivots"),
    pytest.param(
        [("c", C), ("p", P)], "p2", P, "a saga has at most one pivot", id="two-pivots-adjacent"
    ),
    pytest.param(
        [("p", P), ("r", R)],
        "p2",
        P,
        "a saga has at most one pivot",
        id="second-pivot-after-retryable",
    ),
    pytest.param([], "r", R, "retryable steps come after the pivot", id="retryable-first"),
    pytest.param(
        [("c", C)], "r", R, "retryable steps come after the pivot", id="retryable-without-pivot"
    ),
    pytest.param(
        [("n", N)],
        "r",
        R,
        "retryable steps come after the pivot",
        id="retryable-after-noncompensable-only",
    ),
    pytest.param([("a", C)], "a", C, "step names must be unique", id="duplicate-name"),
    pytest.param(
        [("a", C), ("p", P)], "a", N, "step names must be unique", id="duplicate-name-other-kind"
    ),
    pytest.param([], "c", {"kind": "compensable"}, SIDE_EFFECT_RULE, id="no-way-back"),
    pytest.param([], "c", {}, SIDE_EFFECT_RULE, id="no-way-back-default-kind"),
    pytest.param(
        [],
        "p",
        {"kind": "pivot", "compensate": "undo"},
        "only compensable steps take a compensation; this one is pivot",
        id="compensation-on-pivot",
    ),
    pytest.param(
        [("p", P)],
        "r",
        {"kind": "retryable", "compensate": undo},
        "only compensable steps take a compensation; this one is retryable",
        id="compensation-on-retryable",
    ),
    pytest.param(
        [],
        "n",
        {"kind": "noncompensable", "compensate": "undo"},
        "only compensable steps take a compensation; this one is noncompensable",
        id="compensation-on-noncompensable",
    ),
    pytest.param(
        [],
        "c",
        {"compensate": "undo", "no_rollback": "because"},
        "give compensate or no_rollback, not both",
        id="compensate-and-no_rollback",
    ),
    pytest.param(
        [],
        "c",
        {"no_rollback": ""},
        "no_rollback must be a non-empty reason",
        id="empty-no_rollback",
    ),
    pytest.param(
        [],
        "c",
        {"no_rollback": "   "},
        "no_rollback must be a non-empty reason",
        id="blank-no_rollback",
    ),
    pytest.param(
        [],
        "c",
        {"no_rollback": 42},
        "no_rollback must be a non-empty reason",
        id="non-str-no_rollback",
    ),
    pytest.param(
        [],
        "c",
        {"kind": "pivotal"},
        "unknown kind 'pivotal' (one of compensable, pivot, retryable, noncompensable)",
        id="unknown-kind",
    ),
    pytest.param(
        [],
        "c",
        {"kind": "PIVOT"},
        "unknown kind 'PIVOT' (one of compensable, pivot, retryable, noncompensable)",
        id="kind-is-case-sensitive",
    ),
    pytest.param(
        [], "c", {**C, "retries": -1}, "retries must be a whole number >= 0", id="negative-retries"
    ),
    pytest.param(
        [],
        "c",
        {**C, "retries": 1.5},
        "retries must be a whole number >= 0",
        id="fractional-retries",
    ),
    pytest.param(
        [],
        "c",
        {**C, "timeout": 0},
        "timeout must be a positive number of seconds",
        id="zero-timeout",
    ),
    pytest.param(
        [],
        "c",
        {**C, "timeout": "5"},
        "timeout must be a positive number of seconds",
        id="str-timeout",
    ),
    # -- ladder options (issue 4) ------------------------------------------------------
    pytest.param([], "m", {**CN, "tiers": "large"}, TIERS_RULE, id="tiers-a-string"),
    pytest.param([], "m", {**CN, "tiers": ("small", "")}, TIERS_RULE, id="tiers-empty-name"),
    pytest.param([], "m", {**CN, "tiers": ("small", 2)}, TIERS_RULE, id="tiers-not-names"),
    pytest.param([], "m", {**CN, "tiers": 3}, TIERS_RULE, id="tiers-not-a-sequence"),
    pytest.param(
        [], "m", {**CN, "tiers": ("small", "small")}, UNIQUE_TIERS_RULE, id="tiers-duplicate"
    ),
    pytest.param(
        [], "m", {**CN, "tiers": ("small", "fallback")}, UNIQUE_TIERS_RULE, id="tier-fallback"
    ),
    pytest.param(
        [],
        "m",
        {**CN, "tiers": ("fallback",), "fallback": undo},
        UNIQUE_TIERS_RULE,
        id="tier-fallback-with-a-fallback",
    ),
    pytest.param([], "m", {**CN, "rungs": (0, 3)}, RUNGS_RULE, id="rung-3"),
    pytest.param([], "m", {**CN, "rungs": (-1,)}, RUNGS_RULE, id="rung-negative"),
    pytest.param([], "m", {**CN, "rungs": ("0", "1")}, RUNGS_RULE, id="rungs-as-strings"),
    pytest.param([], "m", {**CN, "rungs": 2}, RUNGS_RULE, id="rungs-not-a-collection"),
    pytest.param(
        [],
        "m",
        {**CN, "fallback": "large_model"},
        "fallback must be callable",
        id="fallback-a-name",
    ),
    pytest.param(
        [], "m", {**CN, "validate": "check"}, "validate must be callable", id="validate-a-name"
    ),
    pytest.param(
        [], "m", {**CN, "validate": True}, "validate must be callable", id="validate-a-bool"
    ),
    pytest.param([], "m", {**CN, "ladder": {"retries": 5}}, LADDER_RULE, id="ladder-a-dict"),
    pytest.param([], "m", {**CN, "ladder": 3}, LADDER_RULE, id="ladder-a-number"),
]


@pytest.mark.parametrize(("before", "step", "decl", "rule"), ADD_FAILURES)
def test_bad_step_raises_naming_saga_step_and_rule(
    before: list[tuple[str, dict[str, Any]]], step: str, decl: dict[str, Any], rule: str
) -> None:
    saga = new_saga()
    saga.compensation(undo)
    for name, kw in before:
        add(saga, name, **kw)

    with pytest.raises(DefinitionError) as info:
        add(saga, step, **decl)

    err = info.value
    assert (err.saga, err.step, err.rule) == (SAGA, step, rule)
    assert str(err) == f"saga {SAGA!r}, step {step!r}: {rule}"
    # Bad input writes nothing: the saga still has exactly the steps declared before.
    if before:
        assert [s.name for s in saga.seal()] == [name for name, _ in before]
    else:
        with pytest.raises(DefinitionError, match="a saga needs at least one step"):
            saga.seal()


@pytest.mark.parametrize("bad", ["a.b", "a b", "1a", "a-b", "ä"])
def test_bad_step_name(bad: str) -> None:
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:
        saga.step(name=bad, side_effect=False)(_noop)
    rule = "a step name is letters, digits and underscores"
    assert (info.value.saga, info.value.step, info.value.rule) == (SAGA, bad, rule)
    assert str(info.value) == f"saga {SAGA!r}, step {bad!r}: {rule}"


def test_lambda_needs_an_explicit_step_name() -> None:
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:
        saga.step(side_effect=False)(lambda ctx, inp: None)
    assert (info.value.saga, info.value.step) == (SAGA, "<lambda>")
    assert info.value.rule == "a step name is letters, digits and underscores"


@pytest.mark.parametrize("bad", ["a.b", "a b", "1a", "", "x/y"])
def test_bad_saga_name(bad: str) -> None:
    registry = Registry()
    with pytest.raises(DefinitionError) as info:
        Saga(bad, registry=registry)
    rule = "a saga name is letters, digits and underscores, not a digit first"
    assert (info.value.saga, info.value.step, info.value.rule) == (bad, None, rule)
    assert str(info.value) == f"saga {bad!r}: {rule}"
    assert len(registry) == 0


def test_non_callable_action() -> None:
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:
        saga._add(
            "a",
            "not a function",
            kind="compensable",
            compensate=None,
            verify=None,
            side_effect=False,
        )  # type: ignore[arg-type]
    assert (info.value.step, info.value.rule) == ("a", "the step's action is not callable")


@pytest.mark.parametrize(
    ("ref_kw", "what", "missing"),
    [
        ({"compensate": "delete_identity"}, "compensation", "delete_identity"),
        ({"compensate": undo, "verify": "identity_exists"}, "verifier", "identity_exists"),
    ],
)
def test_unregistered_helper_name_fails_at_seal(
    ref_kw: dict[str, Any], what: str, missing: str
) -> None:
    saga = new_saga()
    add(saga, "create_identity", **ref_kw)  # names are resolved later: no error yet
    rule = f"{what} {missing!r} is not defined (decorate it with @{SAGA}.{what})"
    for use in (Saga.seal, lambda s: s.steps):
        with pytest.raises(DefinitionError) as info:
            use(saga)
        assert (info.value.saga, info.value.step, info.value.rule) == (
            SAGA,
            "create_identity",
            rule,
        )
        assert missing in str(info.value)


def test_seal_after_registering_the_missing_helper_succeeds() -> None:
    saga = new_saga()
    add(saga, "a", compensate="late_undo")
    with pytest.raises(DefinitionError):
        saga.seal()

    def late_undo(ctx: Any, inp: Any) -> None: ...

    saga.compensation(late_undo)
    assert saga.seal()[0].compensate is late_undo


def test_saga_without_steps_fails_at_seal() -> None:
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:
        saga.seal()
    assert (info.value.saga, info.value.step, info.value.rule) == (
        SAGA,
        None,
        "a saga needs at least one step",
    )
    assert str(info.value) == f"saga {SAGA!r}: a saga needs at least one step"


def test_adding_a_step_after_sealing() -> None:
    saga = new_saga()
    add(saga, "a", side_effect=False)
    saga.seal()
    with pytest.raises(DefinitionError) as info:
        add(saga, "b", side_effect=False)
    assert (info.value.saga, info.value.step, info.value.rule) == (
        SAGA,
        "b",
        "the saga is already sealed (in use); declare steps at import",
    )
    assert [s.name for s in saga.steps] == ["a"]


def test_seal_is_idempotent() -> None:
    saga = new_saga()
    add(saga, "a", side_effect=False)
    assert saga.seal() is saga.seal() is saga.steps


def test_same_name_in_the_same_registry() -> None:
    registry = Registry()
    first = Saga(SAGA, registry=registry)
    with pytest.raises(DefinitionError) as info:
        Saga(SAGA, registry=registry)
    assert (info.value.saga, info.value.step, info.value.rule) == (
        SAGA,
        None,
        "another saga already has this name",
    )
    assert registry.get(SAGA) is first
    registry.add(first)  # re-adding the same object is not a conflict
    assert len(registry) == 1


def test_same_name_in_two_registries_is_fine() -> None:
    a, b = Registry(), Registry()
    assert Saga(SAGA, registry=a) is not Saga(SAGA, registry=b)
    assert SAGA in a and SAGA in b


def test_two_helpers_with_one_name() -> None:
    saga = new_saga()
    saga.compensation(undo)
    saga.compensation(undo)  # the same function twice is fine

    def other() -> None: ...

    other.__name__ = "undo"
    with pytest.raises(DefinitionError) as info:
        saga.compensation(other)  # type: ignore[arg-type]
    assert (info.value.step, info.value.rule) == (None, "two helpers are named 'undo'")


def test_lambda_helper_is_rejected() -> None:
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:
        saga.compensation(lambda ctx, inp: None)
    assert info.value.rule.endswith("is not a named function")
    assert info.value.rule.startswith("<function ")


# -- valid definitions -------------------------------------------------------------------


def test_order_of_steps_is_preserved() -> None:
    saga = new_saga()
    saga.compensation(undo)
    names = ["zeta", "alpha", "mid", "pivot_here", "again", "last_one", "really_last"]
    kinds = [C, CN, C, P, R, N, N]
    for name, kw in zip(names, kinds, strict=True):
        add(saga, name, **kw)
    steps = saga.steps
    assert [s.name for s in steps] == names
    assert [s.index for s in steps] == list(range(len(names)))
    assert [s.kind for s in steps] == [
        StepKind.COMPENSABLE,
        StepKind.COMPENSABLE,
        StepKind.COMPENSABLE,
        StepKind.PIVOT,
        StepKind.RETRYABLE,
        StepKind.NONCOMPENSABLE,
        StepKind.NONCOMPENSABLE,
    ]
    assert all(isinstance(s, Step) and s.saga == SAGA for s in steps)


def test_decorator_forms_name_steps_after_their_function() -> None:
    saga = new_saga()

    @saga.step(side_effect=False)
    def look_up(ctx: Any, inp: Any) -> None: ...

    @saga.step(kind=StepKind.PIVOT)
    def charge(ctx: Any, inp: Any) -> None: ...

    @saga.step(name="renamed", kind="noncompensable")
    def notify(ctx: Any, inp: Any) -> None: ...

    assert [(s.name, s.action, s.kind) for s in saga.steps] == [
        ("look_up", look_up, StepKind.COMPENSABLE),
        ("charge", charge, StepKind.PIVOT),
        ("renamed", notify, StepKind.NONCOMPENSABLE),
    ]


def test_bare_decorator_is_compensable_and_needs_a_way_back() -> None:
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:

        @saga.step
        def write(ctx: Any, inp: Any) -> None: ...

    assert (info.value.step, info.value.rule) == ("write", SIDE_EFFECT_RULE)


def test_side_effect_false_needs_no_compensation() -> None:
    saga = new_saga()
    add(saga, "read_only", side_effect=False)
    (step,) = saga.steps
    assert step.kind is StepKind.COMPENSABLE
    assert step.compensate is None and step.compensate_name is None
    assert step.no_rollback is None and step.side_effect is False
    assert step.compensate_task_name is None


def test_compensation_by_name_and_by_callable_resolve() -> None:
    saga = new_saga()

    @saga.compensation
    def undo_a(ctx: Any, inp: Any) -> None: ...

    @saga.verifier
    def a_exists(ctx: Any, inp: Any) -> bool:
        return True

    def undo_b(ctx: Any, inp: Any) -> None: ...

    def b_exists(ctx: Any, inp: Any) -> bool:
        return True

    add(saga, "a", compensate="undo_a", verify="a_exists")
    add(saga, "b", compensate=undo_b, verify=b_exists)
    a, b = saga.steps
    assert (a.compensate, a.compensate_name, a.verify, a.verify_name) == (
        undo_a,
        "undo_a",
        a_exists,
        "a_exists",
    )
    assert (b.compensate, b.compensate_name, b.verify, b.verify_name) == (
        undo_b,
        "undo_b",
        b_exists,
        "b_exists",
    )


def test_task_names() -> None:
    saga = new_saga("provision_agent")
    saga.compensation(undo)
    add(saga, "create_identity", **C)
    add(saga, "activate", **P)
    add(saga, "send_welcome", **N)
    create, activate, send = saga.steps
    assert create.task_name == "sagaq.provision_agent.create_identity"
    assert create.compensate_task_name == "sagaq.provision_agent.create_identity.compensate"
    assert activate.task_name == "sagaq.provision_agent.activate"
    assert activate.compensate_task_name is None
    assert send.task_name == "sagaq.provision_agent.send_welcome"
    assert send.compensate_task_name is None


def test_options_are_kept() -> None:
    saga = new_saga()
    add(saga, "a", no_rollback="audit log", retries=7, timeout=2.5, at_most_once=True)
    (a,) = saga.steps
    assert (a.no_rollback, a.retries, a.timeout, a.at_most_once) == ("audit log", 7, 2.5, True)


# -- ladder options ----------------------------------------------------------------------


def bigger(ctx: Any, inp: Any) -> None:
    return None


def check(ctx: Any, result: Any) -> bool:
    return True


def on_vendor(exc: BaseException) -> FailureClass | None:
    return None


def on_parse(exc: BaseException) -> FailureClass | None:
    return None


@pytest.mark.parametrize(
    ("options", "rungs", "tiers"),
    [
        pytest.param({}, {0}, (), id="plain-step"),
        pytest.param({"tiers": ("small", "large")}, {0, 1, 2}, ("small", "large"), id="tiers"),
        pytest.param({"tiers": ["small", "large"]}, {0, 1, 2}, ("small", "large"), id="list"),
        pytest.param({"fallback": bigger}, {0, 1, 2}, ("fallback",), id="fallback-only"),
        pytest.param(
            {"tiers": ("small", "large"), "fallback": bigger},
            {0, 1, 2},
            ("small", "large", "fallback"),
            id="tiers-and-fallback",
        ),
        pytest.param(
            {"tiers": ("small", "large"), "rungs": (0, 2)},
            {0, 2},
            ("small", "large"),
            id="declared-rungs-win",
        ),
        pytest.param({"rungs": ()}, set(), (), id="no-rungs"),
        pytest.param({"rungs": [1, 1, 0]}, {0, 1}, (), id="rungs-a-list"),
        pytest.param({"tiers": None}, {0}, (), id="tiers-none"),
    ],
)
def test_ladder_options_are_normalised(
    options: dict[str, Any], rungs: set[int], tiers: tuple[str, ...]
) -> None:
    saga = new_saga()
    add(saga, "m", side_effect=False, **options)
    (m,) = saga.steps
    assert m.rungs == frozenset(rungs) and isinstance(m.rungs, frozenset)
    assert m.tiers == tiers and isinstance(m.tiers, tuple)
    assert m.fallback is options.get("fallback")
    assert (m.ladder, m.classify, m.validate) == (Bounds(), (), None)


def test_retries_fold_into_the_ladder() -> None:
    saga = new_saga()
    add(saga, "a", side_effect=False, retries=5)
    add(saga, "b", side_effect=False, retries=0, ladder=Bounds(reprompts=1, cap=9.0))
    add(saga, "c", side_effect=False, ladder=Bounds(per_tier=2))
    add(saga, "d", side_effect=False)
    a, b, c, d = saga.steps
    assert (a.retries, a.ladder) == (5, Bounds(retries=5))
    assert (b.retries, b.ladder) == (0, Bounds(retries=0, reprompts=1, cap=9.0))
    assert (c.retries, c.ladder) == (None, Bounds(per_tier=2))
    assert (d.retries, d.ladder) == (None, Bounds())


def test_validate_and_classifiers_are_kept() -> None:
    saga = new_saga()
    add(saga, "a", side_effect=False, validate=check, classify=on_vendor)
    add(saga, "b", side_effect=False, classify=(on_vendor, on_parse))
    a, b = saga.steps
    assert (a.validate, a.classify) == (check, (on_vendor,))
    assert b.classify == (on_vendor, on_parse)
    assert Saga("s1", classify=on_parse, registry=Registry()).classify == (on_parse,)
    assert Saga("s2", classify=[on_vendor, on_parse], registry=Registry()).classify == (
        on_vendor,
        on_parse,
    )
    assert Saga("s3", ladder=Bounds(retries=1), registry=Registry()).ladder == Bounds(retries=1)
    assert Saga("s4", registry=Registry()).ladder == Bounds()


@pytest.mark.parametrize(
    "bad", ["on_vendor", ("on_vendor",), (on_vendor, 42)], ids=["a-name", "names", "a-number"]
)
def test_a_classifier_that_cannot_be_called_fails_at_declaration(bad: Any) -> None:
    # A classifier is called while the engine handles a failure; one that is not callable
    # would break the failure handling itself, long after import.
    saga = new_saga()
    with pytest.raises(DefinitionError) as info:
        add(saga, "a", side_effect=False, classify=bad)
    assert (info.value.saga, info.value.step) == (SAGA, "a")
    assert "classif" in info.value.rule
    with pytest.raises(DefinitionError) as info:
        Saga("other", classify=bad, registry=Registry())
    assert (info.value.saga, info.value.step) == ("other", None)
    assert "classif" in info.value.rule


@pytest.mark.parametrize(
    ("decls", "expected"),
    [
        ([C, C, P, R, N], 2),
        ([C, P], 1),
        ([P], 0),
        ([P, R], 0),
        ([C, N], 1),
        ([C, C, N, N], 2),
        ([N], 0),
        ([C, CN, C], None),
        ([C], None),
    ],
)
def test_pivot_index(decls: list[dict[str, Any]], expected: int | None) -> None:
    saga = new_saga()
    saga.compensation(undo)
    for i, kw in enumerate(decls):
        add(saga, f"s{i}", **kw)
    assert saga.pivot_index == expected


def test_step_named() -> None:
    saga = new_saga()
    add(saga, "a", side_effect=False)
    add(saga, "b", side_effect=False)
    assert saga.step_named("b").index == 1
    with pytest.raises(UnknownSagaError) as info:
        saga.step_named("zzz")
    assert str(info.value) == f"saga {SAGA!r} has no step 'zzz'"
    assert (info.value.saga, info.value.step) == (SAGA, "zzz")


# -- version -----------------------------------------------------------------------------


def build(decls: list[tuple[str, dict[str, Any]]], *, name: str = SAGA, body: Any = _noop) -> Saga:
    saga = new_saga(name)

    @saga.compensation
    def undo(ctx: Any, inp: Any) -> None: ...

    @saga.compensation
    def undo_other(ctx: Any, inp: Any) -> None: ...

    @saga.verifier
    def check(ctx: Any, inp: Any) -> bool:
        return True

    for step, kw in decls:
        saga.step(name=step, **kw)(body)
    return saga


BASE: list[tuple[str, dict[str, Any]]] = [("a", C), ("b", C), ("p", P), ("r", R), ("n", N)]


def test_version_is_16_hex_and_stable_across_registries() -> None:
    one, two = build(BASE), build(BASE)
    assert one is not two
    assert re.fullmatch(r"[0-9a-f]{16}", one.version)
    assert one.version == two.version
    assert one.version == one.version


def test_version_is_pinned() -> None:
    # Sagas record this hash; if the hashing itself changes, every in-flight saga looks like
    # it belongs to another definition after a deploy (DESIGN §9). Change only on purpose.
    saga = build([("a", C), ("p", P)])
    assert saga.version == "22ca1eb90fcd6509"


def test_version_ignores_function_bodies() -> None:
    def other_body(ctx: Any, inp: Any) -> dict[str, int]:
        return {"totally": 1 + 2}

    assert build(BASE).version == build(BASE, body=other_body).version


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param([("a", C), ("b", C), ("p", P), ("r", R), ("n2", N)], id="step-renamed"),
        pytest.param(
            [("a", C), ("b", CN), ("p", P), ("r", R), ("n", N)], id="compensation-to-no_rollback"
        ),
        pytest.param(
            [("a", C), ("b", {"compensate": "undo_other"}), ("p", P), ("r", R), ("n", N)],
            id="compensation-renamed",
        ),
        pytest.param([("b", C), ("a", C), ("p", P), ("r", R), ("n", N)], id="order"),
        pytest.param([("a", C), ("b", C), ("p", P), ("r", N), ("n", N)], id="kind"),
        pytest.param([("a", C), ("b", C), ("p", N), ("r", N), ("n", N)], id="pivot-gone"),
        pytest.param([("a", C), ("b", C), ("p", P), ("r", R)], id="step-removed"),
        pytest.param(
            [("a", {**C, "verify": "check"}), ("b", C), ("p", P), ("r", R), ("n", N)],
            id="verify-added",
        ),
        pytest.param(
            [("a", C), ("b", C), ("p", P), ("r", R), ("n", {**N, "at_most_once": True})],
            id="at_most_once",
        ),
        pytest.param(
            [("a", C), ("b", {"side_effect": False}), ("p", P), ("r", R), ("n", N)],
            id="side_effect",
        ),
    ],
)
def test_version_changes_with_structure(changed: list[tuple[str, dict[str, Any]]]) -> None:
    assert build(changed).version != build(BASE).version


def test_version_changes_with_saga_name() -> None:
    assert build(BASE, name="orders_v2").version != build(BASE).version


# -- registry ----------------------------------------------------------------------------


def test_registry_get_unknown_lists_known_names() -> None:
    registry = Registry()
    beta = Saga("beta", registry=registry)
    Saga("alpha", registry=registry)
    assert registry.get("beta") is beta
    with pytest.raises(UnknownSagaError) as info:
        registry.get("nope")
    assert str(info.value) == "no saga named 'nope'; known: alpha, beta"
    assert info.value.saga == "nope"


def test_registry_get_unknown_when_empty() -> None:
    with pytest.raises(UnknownSagaError) as info:
        Registry().get("nope")
    assert str(info.value) == (
        "no saga named 'nope'; known: none (import the module that defines it)"
    )


def test_registry_container_protocol() -> None:
    registry = Registry()
    a = Saga("a", registry=registry)
    b = Saga("b", registry=registry)
    assert "a" in registry and "c" not in registry
    assert list(registry) == [a, b]
    assert len(registry) == 2


def test_private_registry_does_not_touch_the_global_one() -> None:
    from sagaq.definition import sagas

    before = len(sagas)
    Saga("only_private_xyz", registry=Registry())
    assert "only_private_xyz" not in sagas
    assert len(sagas) == before
