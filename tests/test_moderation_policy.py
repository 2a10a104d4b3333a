"""Tests for the moderation policy: levels, failures, who is moderated."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from openai_proxy.moderation import (
    Moderation,
    ModerationConfig,
    Plan,
    RequestRefused,
    Verdict,
)
from openai_proxy.moderation.checker import Checker, pieces
from openai_proxy.moderation.policy import stops
from tests.moderation_fakes import FixedBackend, ManualBackend


def result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def attr(plan: Plan | None, name: str) -> Any:
    """An attribute of a plan that must exist."""
    assert plan is not None
    return vars(plan)[name]


def moderation(backend: Any = None, **config: Any) -> Moderation:
    cfg = ModerationConfig(backend="keywords", keywords_file="unused", **config)
    return Moderation(cfg, Clock(), backend=backend or FixedBackend())


class LevelTests(TestCase):
    def test_low_stops_only_block(self) -> None:
        self.assertEqual([stops(v, "low") for v in Verdict], [False, False, True])

    def test_high_stops_anything_but_pass(self) -> None:
        self.assertEqual([stops(v, "high") for v in Verdict], [False, True, True])

    def test_review_passes_low_and_stops_high(self) -> None:
        backend = FixedBackend({"meh": Verdict.REVIEW})
        checker = Checker(backend, Clock(), timeout=1, on_error="block")
        self.assertFalse(result(checker.stops("meh", "low", "k")))
        self.assertTrue(result(checker.stops("meh", "high", "k")))


class FailureTests(TestCase):
    def checker(self, on_error: str, backend: Any = None) -> tuple[Checker, Clock]:
        clock = Clock()
        backend = backend or FixedBackend(errors=("boom",))
        return Checker(backend, clock, timeout=2.0, on_error=on_error), clock

    def test_error_counts_as_block_with_on_error_block(self) -> None:
        checker, _ = self.checker("block")
        self.assertTrue(result(checker.stops("boom", "low", "k")))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_error_counts_as_pass_with_on_error_pass(self) -> None:
        checker, _ = self.checker("pass")
        self.assertFalse(result(checker.stops("boom", "high", "k")))

    def test_timeout_counts_per_on_error_and_late_answer_ignored(self) -> None:
        for on_error, expected in (("block", True), ("pass", False)):
            backend = ManualBackend()
            checker, clock = self.checker(on_error, backend)
            d = checker.stops("slow", "low", "k")
            clock.advance(1.9)
            self.assertFalse(d.called)
            clock.advance(0.2)
            self.assertEqual(result(d), expected)
            backend.answer(
                0, Verdict.BLOCK if not expected else Verdict.PASS
            )  # ignored
            self.assertEqual(clock.getDelayedCalls(), [])

    def test_failure_logged_without_text_or_key(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        checker, _ = self.checker("block")
        checker.stops("boom secret text", "low", "sk-secret-key")
        [logged] = [e for e in events if "moderation call" in e.get("log_format", "")]
        flat = repr(logged)
        self.assertIn("backend exploded", flat)
        self.assertNotIn("sk-secret-key", flat)
        self.assertNotIn("secret text", flat)

    def test_long_text_checked_in_pieces_all_must_pass(self) -> None:
        backend = FixedBackend({"x": Verdict.BLOCK})
        checker = Checker(backend, Clock(), timeout=1, on_error="pass")
        text = "a" * 10_000 + "a" * 9_999 + "x"
        self.assertTrue(result(checker.stops(text, "low", "k")))
        self.assertEqual([len(t) for t, _ in backend.asked], [10_000, 10_000])
        self.assertEqual(pieces("abc", 2), ["ab", "c"])

    def test_backend_gets_the_upstream_key(self) -> None:
        backend = FixedBackend()
        checker = Checker(backend, Clock(), timeout=1, on_error="pass")
        checker.stops("t", "low", "sk-user")
        self.assertEqual(backend.asked, [("t", "sk-user")])


CHAT = b"/v1/chat/completions"


class PlanTests(TestCase):
    def test_request_mode_needs_opt_in(self) -> None:
        m = moderation()
        self.assertIsNone(m.plan(CHAT, {"messages": []}))
        self.assertIsNone(m.plan(CHAT, {"moderation": False}))
        self.assertIsNone(m.plan(CHAT, None))
        plan = m.plan(CHAT, {"moderation": True, "stream": True})
        assert plan is not None
        self.assertEqual((plan.kind, plan.stream, plan.level), ("chat", True, "low"))

    def test_paths_and_kinds(self) -> None:
        m = moderation(mode="always")
        kinds = {
            path: getattr(m.plan(path, {}), "kind", None)
            for path in (
                CHAT,
                b"/v1/completions",
                b"/v1/responses/",
                b"/v1/models",
                b"/v1/embeddings",
            )
        }
        self.assertEqual(
            list(kinds.values()), ["chat", "completions", "responses", None, None]
        )

    def test_always_overrides_moderation_false(self) -> None:
        plan = moderation(mode="always").plan(CHAT, {"moderation": False})
        self.assertIsNotNone(plan)
        self.assertFalse(attr(plan, "stream"))

    def test_off_never_moderates(self) -> None:
        self.assertIsNone(moderation(mode="off").plan(CHAT, {}))

    def test_request_may_raise_level(self) -> None:
        plan = moderation().plan(CHAT, {"moderation": True, "moderation_level": "high"})
        self.assertEqual(attr(plan, "level"), "high")

    def test_request_may_lower_level_under_request_mode(self) -> None:
        plan = moderation(level="high").plan(
            CHAT, {"moderation": True, "moderation_level": "low"}
        )
        self.assertEqual(attr(plan, "level"), "low")

    def test_request_cannot_lower_level_under_always(self) -> None:
        m = moderation(mode="always", level="high")
        self.assertEqual(
            attr(m.plan(CHAT, {"moderation_level": "low"}), "level"), "high"
        )
        m = moderation(mode="always", level="low")
        self.assertEqual(
            attr(m.plan(CHAT, {"moderation_level": "high"}), "level"), "high"
        )

    def test_bad_level_refused(self) -> None:
        e = self.assertRaises(
            RequestRefused,
            moderation().plan,
            CHAT,
            {"moderation": True, "moderation_level": "max"},
        )
        self.assertEqual((e.status, e.code), (400, "invalid_moderation_level"))

    def test_asked_without_backend_is_refused(self) -> None:
        m = Moderation(ModerationConfig(), Clock())
        self.assertIsNone(m.plan(CHAT, {}))
        e = self.assertRaises(RequestRefused, m.plan, CHAT, {"moderation": True})
        self.assertEqual(
            (e.status, e.code, e.type),
            (400, "moderation_unavailable", "invalid_request_error"),
        )
        always = Moderation(ModerationConfig(mode="always"), Clock())
        self.assertRaises(RequestRefused, always.plan, CHAT, {})

    def test_asked_while_off_is_refused(self) -> None:
        e = self.assertRaises(
            RequestRefused, moderation(mode="off").plan, CHAT, {"moderation": True}
        )
        self.assertEqual(e.code, "moderation_unavailable")

    def test_start_and_stop_reach_the_backend(self) -> None:
        backend = ManualBackend()
        m = moderation(backend)
        m.start()
        self.assertTrue(backend.started)
        m.stop()
        self.assertTrue(backend.stopped)

    def test_plan_level_applies_to_checks(self) -> None:
        m = moderation(FixedBackend({"meh": Verdict.REVIEW}))
        low = m.plan(CHAT, {"moderation": True})
        high = m.plan(CHAT, {"moderation": True, "moderation_level": "high"})
        assert low is not None and high is not None
        self.assertFalse(result(low.stops("meh", "k")))
        self.assertTrue(result(high.stops("meh", "k")))


class ObserverTests(TestCase):
    def test_each_call_reported_with_result_and_duration(self) -> None:
        calls: list[tuple[str, str, float]] = []
        clock = Clock()
        backend = ManualBackend()
        checker = Checker(
            backend,
            clock,
            timeout=2.0,
            on_error="pass",
            on_call=lambda *a: calls.append(a),
        )
        first, second = checker.stops("a", "low", "k"), checker.stops("b", "low", "k")
        clock.advance(0.5)
        backend.answer(0, Verdict.REVIEW)
        clock.advance(1.5)
        self.assertEqual(calls, [("manual", "review", 0.5), ("manual", "error", 2.0)])
        self.assertEqual((result(first), result(second)), (False, False))

    def test_failing_observer_changes_nothing(self) -> None:
        def explode(*args: object) -> None:
            raise ZeroDivisionError()

        checker = Checker(
            FixedBackend({"x": Verdict.BLOCK}),
            Clock(),
            timeout=1,
            on_error="pass",
            on_call=explode,
        )
        self.assertTrue(result(checker.stops("x", "low", "k")))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class StopTests(TestCase):
    def test_stop_cancels_waiting_calls_without_leaving_timers(self) -> None:
        backend = ManualBackend()
        clock = Clock()
        config = ModerationConfig(
            mode="always", backend="keywords", keywords_file="x", on_error="block"
        )
        m = Moderation(config, clock, backend=backend)
        m.start()
        plan = m.plan(CHAT, {})
        assert plan is not None
        d = plan.stops("waiting", "k")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        m.stop()
        self.assertTrue(result(d))
        self.assertEqual(clock.getDelayedCalls(), [])
        backend.answer(0, Verdict.PASS)  # a late answer is dropped quietly
        self.assertTrue(backend.stopped)
