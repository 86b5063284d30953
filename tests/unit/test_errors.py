from __future__ import annotations

from app import errors as e
from app.transport.http.problems import ERRORS_BY_CODE, status_for


def test_every_error_has_a_unique_stable_code_and_a_status() -> None:
    codes = [cls.code for cls in e.ALL_ERRORS]
    assert len(codes) == len(set(codes))
    for cls in e.ALL_ERRORS:
        assert 400 <= status_for(cls) <= 599, cls
        assert cls.__doc__, f"{cls.__name__} must say when it is raised and how to recover"


def test_all_errors_lists_every_subclass() -> None:
    def walk(cls: type[e.MedinferError]) -> set[type[e.MedinferError]]:
        found = {cls}
        for sub in cls.__subclasses__():
            found |= walk(sub)
        return found

    assert walk(e.MedinferError) == set(e.ALL_ERRORS)
    assert set(ERRORS_BY_CODE.values()) == set(e.ALL_ERRORS)


def test_client_errors_and_server_errors_are_told_apart() -> None:
    assert status_for(e.ModelNotFoundError) == 404
    assert status_for(e.MalformedBodyError) == 400
    assert status_for(e.PayloadTooLargeError) == 413
    assert status_for(e.ModelNotReadyError) == 503
    assert status_for(e.MedinferError) == 500
