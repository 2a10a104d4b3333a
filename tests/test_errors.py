"""
The proxy's own errors: described once, raised as fresh objects, and no
module keeps an exception instance to raise again and again (each raise
would add its frames to that one instance's traceback, for ever).
"""

from __future__ import annotations

import importlib
import json
import pkgutil

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

import openai_proxy
from openai_proxy.http import errors
from openai_proxy.http.errors import ErrorTemplate, ProxyError

#: What Twisted's own C{connectionDone} and its HTTP client's end of body
#: say: shared Failures handed to C{connectionLost}, never raised.
_CLEAN_ENDS = (ConnectionDone, ResponseDone)


def _raise(error: object) -> None:
    raise error  # type: ignore[misc]


def _shared_exceptions() -> list[str]:
    """
    The module-level exception instances of every C{openai_proxy} module,
    as C{module.name}; a L{Failure} counts, unless it is the kind Twisted
    passes to C{connectionLost} for a clean end (never raised).
    """
    found = []
    modules = pkgutil.walk_packages(openai_proxy.__path__, "openai_proxy.")
    for info in modules:
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, Failure) and value.check(*_CLEAN_ENDS):
                continue
            if isinstance(value, BaseException):
                found.append(f"{info.name}.{name}")
    return found


class ErrorTemplateTests(SynchronousTestCase):
    def test_each_call_is_a_fresh_error(self) -> None:
        first, second = errors.MISSING_KEY(), errors.MISSING_KEY()
        self.assertIsInstance(first, ProxyError)
        self.assertIsNot(first, second)
        self.assertEqual(
            (first.status, first.code, first.type, first.message),
            (
                401,
                "missing_api_key",
                "invalid_request_error",
                errors.MISSING_KEY.message,
            ),
        )

    def test_the_body_is_openai_shaped(self) -> None:
        body = json.loads(errors.UPSTREAM_TIMEOUT().body())
        self.assertEqual(
            body,
            {
                "error": {
                    "message": "The upstream API did not answer in time.",
                    "type": "api_error",
                    "code": "upstream_timeout",
                    "param": None,
                }
            },
        )

    def test_a_template_cannot_be_raised_as_is(self) -> None:
        self.assertRaises(TypeError, _raise, errors.WRONG_PROXY_KEY)

    def test_raising_twice_shares_no_traceback(self) -> None:
        tracebacks = []
        for _ in range(2):
            try:
                raise errors.NO_UPSTREAM_KEY()
            except ProxyError as e:
                tracebacks.append(e.__traceback__)
        self.assertIsNot(tracebacks[0], tracebacks[1])
        assert tracebacks[1] is not None
        self.assertIsNone(tracebacks[1].tb_next)


class NoSharedExceptionTests(SynchronousTestCase):
    def test_no_module_holds_an_exception_instance(self) -> None:
        self.assertEqual(_shared_exceptions(), [])

    def test_the_check_sees_one(self) -> None:
        errors.SHARED_FOR_TEST = ProxyError(400, "x", "y")  # type: ignore[attr-defined]
        self.addCleanup(delattr, errors, "SHARED_FOR_TEST")
        self.assertIn("openai_proxy.http.errors.SHARED_FOR_TEST", _shared_exceptions())

    def test_templates_are_not_exceptions(self) -> None:
        self.assertNotIsInstance(errors.MISSING_KEY, BaseException)
        self.assertIsInstance(errors.MISSING_KEY, ErrorTemplate)
