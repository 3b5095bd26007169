"""One error root: ``except TlregError`` catches whatever any tlreg package raises."""

from __future__ import annotations

import importlib
import inspect
import pickle

import pytest

from tlreg.storage_backends.errors import TlregError

ERROR_MODULES = [
    "tlreg.storage_backends.errors",
    "tlreg.ckpt.errors",
    "tlreg.registry.errors",
    "tlreg.training.errors",
]


def _errors(module_name: str) -> list[type[BaseException]]:
    module = importlib.import_module(module_name)
    return [
        cls
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == module_name
    ]


@pytest.mark.parametrize("module_name", ERROR_MODULES)
def test_every_package_error_derives_from_the_one_root(module_name: str) -> None:
    errors = _errors(module_name)
    assert errors, f"{module_name} defines no error"
    assert [cls.__name__ for cls in errors if not issubclass(cls, TlregError)] == []


@pytest.mark.parametrize("module_name", ERROR_MODULES)
def test_every_package_error_survives_a_pickle_round_trip(module_name: str) -> None:
    # Ray ships exceptions between processes (not from a store: nothing stored is unpickled).
    for cls in _errors(module_name):
        if "__init__" in vars(cls):  # HeadMoved: its own test covers its fields
            continue
        error = cls("branch 'x' not found: run tlreg branches")
        back = pickle.loads(pickle.dumps(error))
        assert (type(back), str(back)) == (cls, str(error))


def test_head_moved_keeps_its_fields_through_a_pickle_round_trip() -> None:
    from tlreg.registry.errors import HeadMoved

    error = HeadMoved("branch 'b' moved: retry", branch="b", expected="c1", actual="c2")
    back = pickle.loads(pickle.dumps(error))
    assert (str(back), back.branch, back.expected, back.actual) == (str(error), "b", "c1", "c2")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:hunter2@127.0.0.1/db",  # another database
        "sqlite:///x.db?timeout=soon",  # a bad option (no password to hide: shown as given)
        "://u:hunter2@127.0.0.1/db",  # not a URL SQLAlchemy can read
        "postgres ql://u:hunter2@127.0.0.1/db",
    ],
)
def test_a_refused_registry_url_is_named_without_its_password(url: str) -> None:
    from tlreg.registry import Registry
    from tlreg.registry.errors import UnsupportedDatabase

    with pytest.raises(UnsupportedDatabase) as caught:
        Registry(url)
    assert "hunter2" not in str(caught.value)
    assert "registry URL" in str(caught.value)
