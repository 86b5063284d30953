"""The site's imaging routing rules: which model reads a study, and whether it explains it."""

from __future__ import annotations

import pytest

from app.errors import ModelSpecError
from app.imaging.routing import Router, parse_routes


def test_a_rule_may_ask_for_the_models_explanation() -> None:
    router = Router(
        parse_routes(
            '[{"modality": ["CR"], "body_part": "chest", "model": "cxr-pneumonia", "explain": true},'
            ' {"modality": "MR", "model": "brain"}]'
        )
    )
    assert router.explains("cxr-pneumonia")
    assert not router.explains("brain")
    assert not router.explains("unrouted")


@pytest.mark.parametrize(
    "text",
    [
        '[{"model": "cxr-pneumonia", "explain": "yes"}]',
        '[{"model": "cxr-pneumonia", "saliency": true}]',
        '{"model": "cxr-pneumonia"}',
    ],
)
def test_a_malformed_rule_is_refused(text: str) -> None:
    with pytest.raises(ModelSpecError):
        parse_routes(text)
